"""The embedded demo: SFD on a small digits teacher that ships with the package, on a laptop CPU.

`python -m sfd_jax.demo --workdir=runs/demo` distils `assets/digits_teacher` (trained by
`python -m sfd_jax.demo.pretrain`) and writes a report comparing the student with the
training-free solvers (`report.py`), measured against the teacher's converged ODE and in the
features of a small digits classifier (`features.py`) on scikit-learn's digits (`data.py`).
"""
