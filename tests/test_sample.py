"""Tests for sfd_jax.sample and sfd_jax.images: seed-determined images on 1 and 8 devices,
class labels, EDM's file layout and quantisation, one-line CLI errors."""
import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

from conftest import EDM_FIXTURES
from sfd_jax import images, sample, sampling, schedules
from sfd_jax.config_types import SamplingSettings

SHAPE = (4, 4, 3)
T_STEPS = schedules.get_schedule(4, 0.002, 80.0)


def gaussian_denoise(variables, x, sigma, class_labels):
  del variables, class_labels
  return 0.3 + 0.25 / (0.25 + sigma ** 2) * (x - 0.3)


# ----------------------------------------------------------------------------------------
# Seeds.


@pytest.mark.parametrize("text, seeds", [
    ("0-4", [0, 1, 2, 3, 4]), ("7", [7]), ("1,5,10-12", [1, 5, 10, 11, 12]), (" 3 , 2 ", [3, 2]),
    ("0-49999", list(range(50000)))])
def test_parse_seeds(text, seeds):
  assert sampling.parse_seeds(text) == seeds


@pytest.mark.parametrize("text", ["", "a", "1,,2", "5-3", "1-2-3", "-1", "1.5", "0-4294967296"])
def test_parse_seeds_errors(text):
  with pytest.raises(ValueError, match=r"^--seeds: ") as info:
    sampling.parse_seeds(text)
  assert "\n" not in str(info.value)


# ----------------------------------------------------------------------------------------
# generate: an image depends on its seed only.


def test_same_seed_same_image_across_batch_sizes_and_devices():
  seeds = range(10)
  kw = dict(t_steps=T_STEPS, solver="heun")
  ref = sampling.generate(gaussian_denoise, SHAPE, seeds, batch_size=3, **kw)
  assert ref.shape == (10,) + SHAPE and ref.dtype == np.float32
  assert len(jax.local_devices()) == 8
  np.testing.assert_array_equal(sampling.generate(gaussian_denoise, SHAPE, seeds, batch_size=8, **kw), ref)
  one = jax.local_devices()[:1]
  np.testing.assert_array_equal(sampling.generate(gaussian_denoise, SHAPE, seeds, batch_size=3, devices=one, **kw), ref)
  np.testing.assert_array_equal(sampling.generate(gaussian_denoise, SHAPE, seeds, batch_size=8, devices=one, **kw), ref)
  # A seed's image does not depend on its neighbours either.
  np.testing.assert_array_equal(sampling.generate(gaussian_denoise, SHAPE, [7, 2], **kw), ref[[7, 2]])


def test_latents_are_unit_gaussian_and_distinct_per_seed():
  # With D = 0, Euler gives x_N = z * t_last exactly in real arithmetic: recover z.
  zero = lambda v, x, s, c: jnp.zeros_like(x)
  out = sampling.generate(zero, (8, 8, 3), range(64), t_steps=T_STEPS, solver="euler", batch_size=64)
  z = out / float(T_STEPS[-1])
  assert abs(z.mean()) < 0.05 and abs(z.std() - 1) < 0.05
  corr = np.corrcoef(z.reshape(64, -1))
  assert np.max(np.abs(corr - np.eye(64))) < 0.3


def test_traced_once_for_all_batches():
  calls = []

  def counted(variables, x, sigma, class_labels):
    calls.append(1)
    return gaussian_denoise(variables, x, sigma, class_labels)

  batches = list(sampling.generate_batches(counted, SHAPE, range(20), t_steps=T_STEPS, solver="euler", batch_size=8))
  assert [len(s) for s, _, _ in batches] == [8, 8, 4]  # last batch padded, then cut
  assert len(calls) == 1  # one trace of the scanned step body, for every batch and step


def test_variables_are_passed_through():
  variables = {"shift": jnp.float32(0.5)}
  den = lambda v, x, s, c: gaussian_denoise(None, x, s, c) + v["shift"]
  a = sampling.generate(den, SHAPE, range(4), t_steps=T_STEPS, solver="euler", variables=variables)
  b = sampling.generate(den, SHAPE, range(4), t_steps=T_STEPS, solver="euler", variables={"shift": jnp.float32(0.0)})
  assert np.max(np.abs(a - b)) > 0.1


def _classes_seen(seeds, **kw):
  """Recovers the class each image was generated with: D = x - sigma * c gives d = c, so the
  Euler endpoint moves by (t_last - t_0) * c relative to the run with D = x."""
  t = schedules.get_schedule(2, 0.002, 80.0)
  with_class = lambda v, x, s, c: x - s * jnp.argmax(c, axis=1).astype(x.dtype)[:, None, None, None]
  plain = lambda v, x, s, c: x
  out = [list(sampling.generate_batches(fn, SHAPE, seeds, t_steps=t, num_classes=10, **kw)) for fn in (with_class, plain)]
  moved = np.concatenate([b[1] for b in out[0]]) - np.concatenate([b[1] for b in out[1]])
  seen = np.rint(moved.mean(axis=(1, 2, 3)) / float(t[1] - t[0])).astype(int)
  returned = np.concatenate([b[2] for b in out[0]])
  return seen, returned


def test_class_per_seed_is_batch_independent():
  seen3, returned3 = _classes_seen(range(40), batch_size=3)
  seen8, _ = _classes_seen(range(40), batch_size=8, devices=jax.local_devices()[:1])
  np.testing.assert_array_equal(seen3, returned3)
  np.testing.assert_array_equal(seen3, seen8)
  np.testing.assert_array_equal(seen3, np.asarray(sampling.seed_classes(jnp.arange(40), 10)))
  assert seen3.min() >= 0 and seen3.max() <= 9 and len(set(seen3)) >= 6


def test_fixed_class():
  seen, returned = _classes_seen(range(5), class_idx=7)
  np.testing.assert_array_equal(seen, 7)
  np.testing.assert_array_equal(returned, 7)


@pytest.mark.parametrize("kw, match", [
    (dict(solver="rk4"), r"solver: unknown solver"),
    (dict(solver="dpmpp", max_order=4), r"max_order: dpmpp needs 1\.\.3"),
    (dict(num_classes=10, class_idx=10), r"class_idx: need 0 <= class < 10"),
    (dict(seeds=[]), r"seeds: empty"),
    (dict(seeds=[-1, 2]), r"seeds: need 0 <= seed"),
])
def test_generate_errors_before_compiling(kw, match):
  calls = []
  den = lambda *a: calls.append(1) or gaussian_denoise(*a)
  seeds = kw.pop("seeds", range(3))
  with pytest.raises(ValueError, match=match):
    sampling.generate_batches(den, SHAPE, seeds, t_steps=T_STEPS, **kw)  # raises at the call
  assert not calls


# ----------------------------------------------------------------------------------------
# images.


def test_to_uint8_is_edms_quantisation():
  x = np.array([-2.0, -1.0, -0.004, 0.0, 0.5, 0.99, 1.0, 3.0], np.float32)
  np.testing.assert_array_equal(images.to_uint8(x), [0, 0, 127, 128, 191, 254, 255, 255])


def test_png_layout_grayscale_and_grid(tmp_path):
  rng = np.random.default_rng(0)
  gray = rng.integers(0, 256, (3, 5, 6, 1), dtype=np.uint8)
  images.save_seed_images(tmp_path, [1, 999, 1000], gray)
  paths = [tmp_path / "000000" / "000001.png", tmp_path / "000000" / "000999.png", tmp_path / "001000" / "001000.png"]
  for path, image in zip(paths, gray):
    with Image.open(path) as png:
      assert png.mode == "L"
      np.testing.assert_array_equal(np.asarray(png), image[..., 0])
  rgb = rng.integers(0, 256, (5, 2, 3, 3), dtype=np.uint8)
  grid = images.make_grid(rgb)  # 3 columns, 2 rows, black padding
  assert grid.shape == (4, 9, 3)
  np.testing.assert_array_equal(grid[2:4, 3:6], rgb[4])
  np.testing.assert_array_equal(grid[2:4, 6:9], 0)
  images.save_grid(tmp_path / "g.png", rgb)
  with Image.open(tmp_path / "g.png") as png:
    assert png.mode == "RGB"
    np.testing.assert_array_equal(np.asarray(png), grid)


# ----------------------------------------------------------------------------------------
# Command line.

PKL = str(EDM_FIXTURES / "edm_ddpmpp_uncond.pkl")


def test_cli_teacher_end_to_end(tmp_path):
  argv = ["--network", PKL, "--seeds", "0-2,1500", "--batch", "3", "--solver", "dpmpp", "--num_steps", "3",
          "--afs", "--outdir", str(tmp_path / "png"), "--npz", str(tmp_path / "all.npz"),
          "--grid", str(tmp_path / "grid.png"), "--noprogress"]
  assert sample.main(argv) == 0
  data = np.load(tmp_path / "all.npz")
  np.testing.assert_array_equal(data["seeds"], [0, 1, 2, 1500])
  assert data["arr_0"].shape == (4, 16, 16, 3) and data["arr_0"].dtype == np.uint8
  for seed, image in zip(data["seeds"], data["arr_0"]):
    with Image.open(images.seed_path(tmp_path / "png", int(seed))) as png:
      np.testing.assert_array_equal(np.asarray(png), image)
  assert (tmp_path / "png" / "001000" / "001500.png").is_file()
  with Image.open(tmp_path / "grid.png") as png:
    assert png.size == (32, 32)
  # The same images through the importable core, one at a time on one device (the CLI ran
  # batches of 8 over 8 devices): the network's images depend on the seed only.
  from sfd_jax.teacher import load_teacher  # pylint: disable=g-import-not-at-top
  teacher = load_teacher(PKL)
  den = lambda v, x, s, c: teacher.denoise(v, x, s, class_labels=c)
  out = sampling.generate(den, (16, 16, 3), [0, 1, 2, 1500], t_steps=schedules.get_schedule(3, 0.002, 80.0),
                        solver="dpmpp", afs=True, variables=teacher.params, batch_size=1,
                        devices=jax.local_devices()[:1])
  np.testing.assert_array_equal(images.to_uint8(out), data["arr_0"])


@pytest.mark.parametrize("argv, message", [
    (["--grid", "g.png"], "--network or --student: give the model"),
    (["--network", PKL], "--outdir, --npz or --grid: give at least one output"),
    (["--network", PKL, "--grid", "g.png", "--seeds", "3-1"], "--seeds: bad range '3-1'"),
    (["--network", PKL, "--grid", "g.png", "--seeds", "x"], "--seeds: malformed part 'x'"),
    (["--network", PKL, "--grid", "g.png", "--solver", "rk4"], "--solver: unknown solver 'rk4'; valid: "),
    (["--network", PKL, "--grid", "g.png", "--schedule", "cos"], "--schedule: unknown schedule 'cos'"),
    (["--network", PKL, "--grid", "g.png", "--solver", "ipndm", "--max_order", "5"], "--max_order: ipndm needs 1..4"),
    (["--network", PKL, "--grid", "g.png", "--num_steps", "1"], "--num_steps: need an integer >= 2"),
    (["--network", PKL, "--grid", "g.png", "--batch", "0"], "--batch: need at least 1"),
    (["--network", PKL, "--grid", "g.png", "--class", "3"], "--class: the model is unconditional"),
    (["--network", "/no/such.pkl", "--grid", "g.png"], "/no/such.pkl: no such file or directory"),
    (["--student", "/no/such/run", "--grid", "g.png"], "/no/such/run: no such student checkpoint"),
    (["--network", PKL, "--student", "x", "--grid", "g.png"], "--network or --student: give the model to sample from (exactly one)"),
])
def test_cli_errors_are_one_line(capsys, argv, message):
  with pytest.raises(SystemExit) as info:
    sample.main(argv)
  assert info.value.code == 2
  err = capsys.readouterr().err
  assert err.startswith("python -m sfd_jax.sample: error: ") and message in err, err
  assert err.count("\n") == 1 and "Traceback" not in err


def test_student_settings_come_from_the_checkpoint():
  stored = SamplingSettings(num_steps=4, schedule_type="polynomial", schedule_rho=7.0, afs=True, sigma_min=0.006,
                            sigma_max=80.0, use_step_condition=False)
  s = sampling.student_settings(stored)
  assert (s.solver, s.num_steps, s.afs, s.use_step_condition) == ("euler", 4, True, False)
  with pytest.raises(ValueError, match=r"^--num_steps: this student was distilled for 4 time points"):
    sampling.student_settings(stored, num_steps=6)
  with pytest.raises(ValueError, match=r"^--solver: a student samples with the settings stored"):
    sampling.student_settings(stored, solver="heun")
  # SFD-v: any num_steps, passed to the network as its step condition.
  s = sampling.student_settings(dataclasses.replace(stored, use_step_condition=True), num_steps=6)
  assert (s.num_steps, s.use_step_condition) == (6, True)


def test_cli_student_end_to_end(tmp_path):
  # A "student" checkpoint holding the fixture network, written with the training checkpoint
  # helpers; sampling must use Euler + AFS on the stored schedule, with no sampler flags.
  from sfd_jax import checkpoint  # pylint: disable=g-import-not-at-top
  from sfd_jax.teacher import load_teacher  # pylint: disable=g-import-not-at-top
  teacher = load_teacher(PKL)
  settings = SamplingSettings(num_steps=3, schedule_type="polynomial", schedule_rho=7.0, afs=True,
                              sigma_min=0.006, sigma_max=80.0, use_step_condition=False).to_dict()
  manager = checkpoint.make_manager(tmp_path / "run")
  checkpoint.save(manager, 5, teacher.params["params"], teacher.params["buffers"], {"count": np.zeros((), np.int32)},
                  dict(network=teacher.config.to_dict(), settings=settings, dataset_name="fixture"))
  manager.wait_until_finished()
  manager.close()
  out_npz = tmp_path / "s.npz"
  assert sample.main(["--student", str(tmp_path / "run"), "--seeds", "3,4", "--npz", str(out_npz),
                      "--noprogress"]) == 0
  den = lambda v, x, s, c: teacher.denoise(v, x, s, class_labels=c)
  ref = sampling.generate(den, (16, 16, 3), [3, 4], t_steps=schedules.get_schedule(3, 0.006, 80.0),
                        solver="euler", afs=True, variables=teacher.params, batch_size=8)
  np.testing.assert_array_equal(np.load(out_npz)["arr_0"], images.to_uint8(ref))
