"""DEFENSES: registry name → defense class. A defense joins the contract suite by being here.

`load_defense(folder, classifier, vae)` rebuilds whatever defense an artifact folder holds: its
config.json's kind names the class.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from torch import nn

from fmdefense.core.artifacts import CONFIG_FILE, read_json
from fmdefense.core.errors import ArtifactError, InputError
from fmdefense.defenses.base import Defense
from fmdefense.defenses.default import DefaultDefense
from fmdefense.defenses.defense_gan import DefenseGAN
from fmdefense.defenses.ensemble import EnsembleDefense
from fmdefense.defenses.fbgan import FBGANDefense
from fmdefense.defenses.fm.detector import FMDefense
from fmdefense.defenses.magnet import MagNet
from fmdefense.defenses.recon_check import ReconstructionCheck

DEFENSES: dict[str, type[Defense]] = {
    DefaultDefense.name: DefaultDefense,
    FMDefense.name: FMDefense,
    ReconstructionCheck.name: ReconstructionCheck,
    MagNet.name: MagNet,
    DefenseGAN.name: DefenseGAN,
    FBGANDefense.name: FBGANDefense,
    EnsembleDefense.name: EnsembleDefense,
}
KINDS: dict[str, type[Defense]] = {cls.kind: cls for cls in DEFENSES.values()}
# Defenses whose `load` needs the combo-VAE beside the classifier (the others hold their networks)
VAE_DEFENSES = (DefaultDefense.name, FMDefense.name, ReconstructionCheck.name)


def defense_class(folder: Path) -> type[Defense]:
    """The class of the defense saved in `folder`, from its config.json's kind."""
    folder = Path(folder)
    if not folder.is_dir():
        raise ArtifactError(f"defense folder {folder} does not exist")
    meta = read_json(folder / CONFIG_FILE)
    kind = meta.get("kind") if isinstance(meta, dict) else None
    if kind not in KINDS:
        raise ArtifactError(
            f"{folder} holds a {kind!r} artifact, not a defense; expected one of {', '.join(KINDS)}"
        )
    return KINDS[kind]


def needs_vae(cls: type[Defense]) -> bool:
    """Whether `cls.load` takes the combo-VAE (`vae=`)."""
    return cls.name in VAE_DEFENSES


def load_defense(folder: Path, classifier: nn.Module, vae: Any = None) -> Defense:
    """The calibrated defense in `folder` (any registered kind) around `classifier`, with the
    combo-VAE for the kinds built on it; its own networks follow the classifier's device."""
    cls = defense_class(folder)
    models: dict[str, Any] = {}
    if needs_vae(cls):
        if vae is None:
            raise InputError(f"{folder} holds a {cls.kind} defense: it needs its combo-VAE")
        models["vae"] = vae
    defense = cls.load(folder, classifier, **models)
    aes = getattr(defense, "autoencoders", None)  # the default's MagNet pair (a tuple)
    if isinstance(aes, tuple):
        for ae in aes:
            ae.to(defense.device)
    return defense
