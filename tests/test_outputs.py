"""Committed notebook outputs are fresh: executed again, each notebook that commits outputs gives the same outputs
(timings, addresses, tqdm bars and figure bytes aside) and none is an error. These notebooks run here instead of in
`nbdev_test` (the Makefile skips them there), so the check costs only the comparison."""
import multiprocessing as mp
from concurrent.futures import ProcessPoolExecutor

import nbformat, pytest

from concept_nb.core import repo_root
from concept_nb.docs import _output_nbs, execute_notebook, notebooks_with_outputs, output_digest

NBS = repo_root(__file__)/'nbs'
# Module notebooks whose outputs are not committed (nbdev_test runs them); a new module notebook joins here until its
# outputs are committed.
PENDING = set()
# Those with outputs (skipped by `nbdev_test`) and the other module notebooks (which may produce no output at all).
NOTEBOOKS = sorted(set(notebooks_with_outputs(NBS)) | {p for p in _output_nbs(NBS) if p.name not in PENDING})


def _fresh(path):
    return output_digest(execute_notebook(path))


@pytest.fixture(scope='module')
def fresh():
    "Fresh digests of every notebook, each executed in a fresh process as `nbdev_test` would, two at a time."
    with ProcessPoolExecutor(2, mp_context=mp.get_context('spawn'), max_tasks_per_child=1) as ex:   # one each
        return dict(zip(NOTEBOOKS, ex.map(_fresh, NOTEBOOKS)))


@pytest.mark.parametrize('path', NOTEBOOKS, ids=[p.name for p in NOTEBOOKS])
def test_committed_outputs_are_fresh(path, fresh):
    committed = output_digest(nbformat.read(str(path), as_version=4))
    errors = [o for cell in committed for o in cell if o[0] == 'error']
    assert not errors, f"{path.name} commits an error output: {errors[0]}"
    stale = [(i, c, f) for i, (c, f) in enumerate(zip(committed, fresh[path])) if c != f]
    assert len(committed) == len(fresh[path]) and not stale, \
        f"{path.name}: committed outputs differ from a fresh run (run `make outputs`); first code cell {stale[:1]}"
