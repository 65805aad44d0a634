"""DEFENSES: registry name → defense class. A defense joins the contract suite by being here."""

from __future__ import annotations

from fmdefense.defenses.base import Defense
from fmdefense.defenses.default import DefaultDefense
from fmdefense.defenses.defense_gan import DefenseGAN
from fmdefense.defenses.fm.detector import FMDefense
from fmdefense.defenses.magnet import MagNet
from fmdefense.defenses.recon_check import ReconstructionCheck

DEFENSES: dict[str, type[Defense]] = {
    DefaultDefense.name: DefaultDefense,
    FMDefense.name: FMDefense,
    ReconstructionCheck.name: ReconstructionCheck,
    MagNet.name: MagNet,
    DefenseGAN.name: DefenseGAN,
}
