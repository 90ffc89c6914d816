"""The explorer: a local web app (`python run_experiments.py --serve STUDY_ID`, app.py) and a Python
API (core.py) over a study's arms, their latents, and the subject model run with an arm's SAE.
docs/explorer.md describes both."""
from experiments.explorer.core import Explorer, ExplorerError

__all__ = ["Explorer", "ExplorerError"]
