"The paths a new user walks (issue 17): no silent success, resumable runs, quiet readable output, parsed parameters."
import json, os, re, signal, subprocess, sys, time
from pathlib import Path

import nbformat, papermill as pm, pytest

from concept_nb import runs as R, registry as RG, cli as CLI
from concept_nb.core import repo_root

ROOT = repo_root(Path(__file__))
NBS = sorted((ROOT / 'nbs').glob('[0-9]*.ipynb'))
ENV = {**os.environ, 'OMP_NUM_THREADS': '1', 'WANDB_MODE': 'disabled', 'MPLBACKEND': 'Agg',
       'TOKENIZERS_PARALLELISM': 'false', 'PYTHONPATH': str(ROOT)}


def _parameterised():
    return [p for p in NBS if R._ast_params(nbformat.read(str(p), as_version=4))]


@pytest.mark.parametrize('nb', _parameterised(), ids=lambda p: p.name)
def test_every_parameter_is_parsed_by_papermill(nb, capsys):
    "papermill's inspector (`papermill --help-notebook`, and what `-p` injects into) sees every parameter line."
    declared = set(R._ast_params(nbformat.read(str(nb), as_version=4)))
    parsed = set(pm.inspect_notebook(str(nb)))
    assert declared - parsed == set(), f"papermill cannot parse {sorted(declared - parsed)} (a ' = ' in the comment?)"
    assert CLI.main(['pretrain', '--template', str(nb), '--help-notebook']) == 0
    listed = {l.split()[0] for l in capsys.readouterr().out.splitlines() if l.startswith('  ')}
    assert declared <= listed
