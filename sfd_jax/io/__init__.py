"""File formats: EDM snapshot pickles, PyTorch `.pt` files, converted directories.

Every untrusted pickle is read through `unpickler.RestrictedUnpickler`; nothing here imports torch.
"""
from sfd_jax.io.converted import load_converted, save_converted
from sfd_jax.io.edm_pickle import EDMPickleError, EDMSnapshot, read_edm_snapshot
from sfd_jax.io.network_files import convert_network, export_state_dict, load_network
from sfd_jax.io.torch_files import TorchFormatError, load_state_dict, save_state_dict

__all__ = ["load_converted", "save_converted", "EDMPickleError", "EDMSnapshot", "read_edm_snapshot",
           "convert_network", "export_state_dict", "load_network", "TorchFormatError", "load_state_dict", "save_state_dict"]
