"""Experiments over ordinary `cnnlab train` runs: the degradation experiment of He et al. 2016 and repeated seeds."""

from .api import default_folder, gather, member_commands, run_experiment
from .degradation import PAPER_TEST_ERROR, degradation_spec, parse_depths
from .runner import ExperimentFailed, ExperimentInterrupted, ExperimentSpec, Member
from .seeds import parse_seeds, seed_statistics, seeds_spec

__all__ = [
    "run_experiment",
    "gather",
    "member_commands",
    "default_folder",
    "degradation_spec",
    "parse_depths",
    "PAPER_TEST_ERROR",
    "seeds_spec",
    "parse_seeds",
    "seed_statistics",
    "ExperimentSpec",
    "Member",
    "ExperimentFailed",
    "ExperimentInterrupted",
]
