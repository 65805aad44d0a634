"""DEFENSES: registry name → defense class. A defense joins the contract suite by being here."""

from __future__ import annotations

from fmdefense.defenses.base import Defense
from fmdefense.defenses.fbgan import FBGANDefense
from fmdefense.defenses.fm.detector import FMDefense
from fmdefense.defenses.recon_check import ReconstructionCheck

DEFENSES: dict[str, type[Defense]] = {
    FMDefense.name: FMDefense,
    ReconstructionCheck.name: ReconstructionCheck,
    FBGANDefense.name: FBGANDefense,
}
