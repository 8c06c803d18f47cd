"Sweeps (issue 18): grid expansion, bad sweep files, the local dask engine, failure isolation, resume after a kill."
import contextlib, io, json, os, signal, subprocess, sys, time
from pathlib import Path

import pytest, yaml

from concept_nb import cli as CLI, sweep as SW
from concept_nb.core import repo_root
from concept_nb.pretrain import PRETRAIN_DEFAULTS

ROOT = repo_root(Path(__file__))


def _yaml(path, d):
    path.write_text(yaml.safe_dump(d, sort_keys=False)); return path


def _run_dirs(runs):
    return sorted(p for p in Path(runs).iterdir() if p.is_dir()) if Path(runs).exists() else []


def test_grid_expansion_and_hash():
    "grid x configs x seeds; the hash ignores key order, sweep id and seeds, and is a fixed function of the config."
    spec = SW.load_sweep(dict(sweep_id='g', preset='smoke', params={'steps': 3},
                              configs=[{'name': 'a', 'concept_losses': 'none'}, {'concept_losses': 'rank'}],
                              grid={'lr': [1e-3, 3e-3], 'loss_weight': [0.1]}, seeds=[5, 6, 7]))
    runs = SW.sweep_runs(spec)
    assert len(runs) == 2 * 2 * 1 * 3
    assert [r.run_name for r in runs[:4]] == ['g_a_lr=0.001_loss_weight=0.1_s5', 'g_a_lr=0.001_loss_weight=0.1_s6',
                                              'g_a_lr=0.001_loss_weight=0.1_s7', 'g_a_lr=0.003_loss_weight=0.1_s5']
    assert runs[-1].run_name == 'g_concept_losses=rank_lr=0.003_loss_weight=0.1_s7'
    assert runs[0].params == {'steps': 3, 'concept_losses': 'none', 'lr': 1e-3, 'loss_weight': 0.1, 'seed': 5,
                              'sweep_id': 'g', 'config_hash': runs[0].config_hash, 'run_name': runs[0].run_name}
    by_cfg = {}
    for r in runs: by_cfg.setdefault(r.config, set()).add((r.config_hash, r.seed))
    assert len(by_cfg) == 4 and all(len({h for h, _ in v}) == 1 and len(v) == 3 for v in by_cfg.values())
    assert len({r.config_hash for r in runs}) == 4
    # stable: another sweep id, other seeds, keys in another order -> the same hashes; a literal guards the function
    spec2 = SW.load_sweep(dict(sweep_id='other', preset='smoke', params={'steps': 3}, seeds=[1],
                               configs=[{'concept_losses': 'none', 'name': 'a'}, {'concept_losses': 'rank'}],
                               grid={'loss_weight': [0.1], 'lr': [1e-3, 3e-3]}))
    assert {r.config_hash for r in SW.sweep_runs(spec2)} == {r.config_hash for r in runs}
    assert SW.config_hash('pretrain', 'smoke', {'lr': 0.001, 'steps': 3}) == 'e3f9db42f9'
    assert SW.config_hash('pretrain', 'smoke', {'lr': 0.001, 'steps': 4}) != 'e3f9db42f9'
    # the bookkeeping params are declared once, in PretrainParams (and the GLUE template's parameters cell)
    assert PRETRAIN_DEFAULTS['sweep_id'] == '' and PRETRAIN_DEFAULTS['config_hash'] == ''
    # GLUE: one run per configuration, the seeds inside it
    g = SW.sweep_runs(SW.load_sweep(dict(sweep_id='gl', template='glue', grid={'lr': [1e-4, 1e-3]}, seeds=[1, 2, 3])))
    assert [(r.seed, r.params['seeds']) for r in g] == [(None, '1,2,3'), (None, '1,2,3')]


@pytest.mark.parametrize('sweep, msg', [
    (dict(template='pretrain', preset='smoke', grid={'concept_loses': ['none']}),
     "configuration concept_loses=none: unknown parameter 'concept_loses' (did you mean 'concept_losses'?)"),
    (dict(template='pretrain', preset='smoke', configs=[{'name': 'x', 'steps': 'many'}]),
     "configuration x: parameter 'steps' must be int, got str 'many'"),
    (dict(template='pretrain', preset='smoke', grid={}), "empty grid"),
    (dict(template='pretrian', grid={'lr': [1e-3]}),
     "'pretrian' is not one of ['glue', 'pretrain'] (did you mean 'pretrain'?)"),
    (dict(template='pretrain', gird={'lr': [1e-3]}), "unknown field 'gird' (did you mean 'grid'?)"),
    (dict(template='pretrain', preset='smok', grid={'lr': [1e-3]}), "unknown preset 'smok' (did you mean 'smoke'?)"),
])
def test_bad_sweep_files(tmp_path, sweep, msg):
    "Rejected before any run starts: exit 2, one line naming the file and the problem, no run folder."
    f = _yaml(tmp_path/'bad.yaml', sweep)
    err = io.StringIO()
    with contextlib.redirect_stderr(err): rc = CLI.main(['sweep', str(f), '--runs-dir', str(tmp_path/'runs')])
    lines = err.getvalue().strip().splitlines()
    assert rc == 2 and len(lines) == 1 and lines[0].startswith('concept-nb sweep: bad parameter: sweep bad')
    assert msg in lines[0], lines[0]
    assert not (tmp_path/'runs').exists()


@pytest.fixture(scope='module')
def toy(tmp_path_factory):
    return SW.toy_template(tmp_path_factory.mktemp('toy')/'toy.ipynb')


def test_local_engine_isolates_failure(tmp_path, toy, capsys):
    "2 local jobs: the failing configuration is reported with its error, the others complete; the report has them all."
    runs = tmp_path/'runs'
    f = _yaml(tmp_path/'toy.yaml', dict(sweep_id='toy', notebook=str(toy), seeds=[1, 2],
                                        configs=[{'name': 'good', 'x': 1.5}, {'name': 'bad', 'x': 2.0, 'fail': True}]))
    rc = CLI.main(['sweep', str(f), '--jobs', '2', '--runs-dir', str(runs)])
    out = capsys.readouterr().out
    assert rc == 1
    names = {p.name.split('_', 1)[1] for p in _run_dirs(runs)}
    assert names == {'toy_good_s1', 'toy_good_s2', 'toy_bad_s1', 'toy_bad_s2'}
    for p in _run_dirs(runs):
        params = json.loads((p/'params.json').read_text())['params']
        assert params['sweep_id'] == 'toy' and len(params['config_hash']) == 10
    assert 'FAILED toy_bad_s1: RuntimeError: toy failure at x=2.0' in out and 'FAILED toy_bad_s2' in out
    assert 'sweep toy: 2/4 done, 0 running, 2 failed, 0 queued, finished' in out   # the last progress line
    assert 'sweep toy finished' in out and '2/4 completed' in out
    # the report: one row per configuration, mean ± sd over the seeds, and the failed runs with their error
    assert CLI.main(['sweep-report', str(f), '--runs-dir', str(runs), '--out', str(tmp_path/'rep.md')]) == 0
    md = (tmp_path/'rep.md').read_text()
    good = next(l for l in md.splitlines() if l.startswith('| good |'))
    assert '| 2 | 0 |' in good and '0.265 ± 0.0071' in good      # eval_loss (1.5-1)^2 + 0.01 seed over seeds 1, 2
    assert next(l for l in md.splitlines() if l.startswith('| bad |')).split('|')[3:5] == [' 0 ', ' 2 ']
    assert 'toy failure at x=2.0' in md and (tmp_path/'rep.png').stat().st_size > 0
    log = (runs/'EXPERIMENT_LOG.md').read_text()
    assert 'sweep/config' in log


def _wait(cond, timeout=240):
    t = time.time()
    while not cond():
        if time.time() - t > timeout: raise TimeoutError('condition not reached')
        time.sleep(0.5)


def test_resume_after_killed_sweep(tmp_path, toy):
    "Kill a sweep mid-run; the rerun skips the completed run and continues the interrupted one from its checkpoint."
    runs = tmp_path/'runs'
    f = _yaml(tmp_path/'k.yaml', dict(sweep_id='k', notebook=str(toy), seeds=[1],
                                      configs=[{'name': 'quick', 'x': 1.0}, {'name': 'slow', 'x': 0.5, 'hang': 300.0}]))
    env = {**os.environ, 'PYTHONPATH': str(ROOT)}
    proc = subprocess.Popen([sys.executable, '-m', 'concept_nb.cli', 'sweep', str(f), '--runs-dir', str(runs)],
                            cwd=ROOT, env=env, start_new_session=True, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    try:
        def slow_dir():
            return next((p for p in _run_dirs(runs) if p.name.endswith('_k_slow_s1')), None)
        _wait(lambda: slow_dir() is not None and (slow_dir()/'checkpoints'/'step-1'/'COMPLETE').exists()
              and (slow_dir()/'params.json').exists())
    finally:
        os.killpg(proc.pid, signal.SIGKILL); proc.wait()
    slow = next(p for p in _run_dirs(runs) if p.name.endswith('_k_slow_s1'))
    kernel = json.loads((slow/'params.json').read_text())   # the toy's kernel runs in its own session: end it too
    quick = [p for p in _run_dirs(runs) if '_k_quick_' in p.name]
    assert len(quick) == 1 and json.loads((quick[0]/'metrics.json').read_text())['status'] == 'completed'
    assert json.loads((slow/'metrics.json').read_text())['status'] == 'running'   # killed: never finished
    _kill_toy_kernels(slow)
    s = SW.run_sweep(f, runs, jobs=1, log=lambda *a: None)
    st = {r['run_name']: r for r in s['runs']}
    assert st['k_quick_s1']['status'] == 'skipped' and st['k_slow_s1']['status'] == 'completed'
    assert st['k_slow_s1']['resumed_from'] == str(slow/'checkpoints'/'step-1')
    assert [p for p in _run_dirs(runs) if '_k_quick_' in p.name] == quick          # not run again
    new = [p for p in _run_dirs(runs) if '_k_slow_s1' in p.name and p != slow]
    assert len(new) == 1 and json.loads((new[0]/'params.json').read_text())['params']['resume_from'] == \
        str(slow/'checkpoints'/'step-1')
    assert kernel['params']['config_hash'] == json.loads((new[0]/'params.json').read_text())['params']['config_hash']
    # and a third run has nothing left to do
    s = SW.run_sweep(f, runs, jobs=1, log=lambda *a: None)
    assert {r['status'] for r in s['runs']} == {'skipped'}


def _kill_toy_kernels(run_dir):
    "End the orphaned toy kernel of a killed run (it sleeps in its own session, started by this test's sweep)."
    pid_file = Path(run_dir)/'kernel.pid'
    if pid_file.exists():
        with contextlib.suppress(ProcessLookupError): os.kill(int(pid_file.read_text()), signal.SIGKILL)
