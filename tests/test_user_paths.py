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
WANDB_ON = {k: v for k, v in ENV.items() if k != 'WANDB_MODE'}   # the notebook's default: wandb offline


def _parameterised():
    return [p for p in NBS if R._ast_params(nbformat.read(str(p), as_version=4))]


@pytest.fixture(scope='module', autouse=True)
def console_run(tmp_path_factory):
    "`concept-nb pretrain` at the smoke defaults through papermill, started first so it runs beside the other tests."
    d = tmp_path_factory.mktemp('console')
    with open(d / 'out.txt', 'w') as out:
        p = subprocess.Popen([sys.executable, '-m', 'concept_nb.cli', 'pretrain', '--runs-dir', str(d / 'runs')],
                             cwd=d, env=WANDB_ON, stdout=out, stderr=subprocess.STDOUT, text=True)
    yield p, d / 'out.txt'
    if p.poll() is None: p.kill()


@pytest.mark.parametrize('nb', _parameterised(), ids=lambda p: p.name)
def test_every_parameter_is_parsed_by_papermill(nb, capsys):
    "papermill's inspector (`papermill --help-notebook`, and what `-p` injects into) sees every parameter line."
    declared = set(R._ast_params(nbformat.read(str(nb), as_version=4)))
    parsed = set(pm.inspect_notebook(str(nb)))
    assert declared - parsed == set(), f"papermill cannot parse {sorted(declared - parsed)} (a ' = ' in the comment?)"
    assert CLI.main(['pretrain', '--template', str(nb), '--help-notebook']) == 0
    listed = {l.split()[0] for l in capsys.readouterr().out.splitlines() if l.startswith('  ')}
    assert declared <= listed


NOISE = re.compile(r'Traceback|Input Notebook|Output Notebook|<Figure|<IPython|Kernel is running over TCP|IProgress|'
                   r'wandb:|Executing Cell|run_name +|^\s+value\s')


def _noise(text:str) -> list:
    return [l for l in text.splitlines() if NOISE.search(l)]


def _history(run_dir:Path) -> list:
    keys = ('step', 'kind', 'loss', 'task_loss', 'eval_loss', 'lr', 'grad_norm', 'concept/effective_rank')
    rows = [json.loads(l) for l in (run_dir / 'history.jsonl').read_text().splitlines() if l.strip()]
    return [tuple(r.get(k) for k in keys) for r in rows]


def test_ctrl_c_says_one_line_and_resume_continues_the_same_run(tmp_path, capfd):
    "Ctrl-C (SIGINT to the process group, as a terminal sends it) after a checkpoint: one line, status 'interrupted';"
    "`pretrain --resume` continues in the same folder to the same history as an uninterrupted run."
    runs = tmp_path / 'runs'
    p = subprocess.Popen([sys.executable, '-m', 'concept_nb.cli', 'pretrain', '--direct', '--runs-dir', str(runs),
                          '-p', 'steps', '30'], cwd=tmp_path, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                         text=True, start_new_session=True,               # a shell's job: Ctrl-C is not ignored
                         preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    t0 = time.time()
    while p.poll() is None and not list(runs.glob('*/checkpoints/step-10/COMPLETE')) and time.time() - t0 < 300:
        time.sleep(0.02)
    os.killpg(p.pid, signal.SIGINT)
    out, err = p.communicate(timeout=120)
    assert p.returncode == 130, (out[-2000:], err[-3000:])
    assert err.strip().count('\n') == 0 and 'Traceback' not in err + out, err[-3000:]
    assert re.match(r"concept-nb pretrain: interrupted at step \d+ .*last complete checkpoint .*step-\d+; ", err), err
    run_dir = next(d for d in runs.iterdir() if d.is_dir())                # the command to paste: this python, this run
    assert err.strip().endswith(f'continue with: {sys.executable} -m concept_nb.cli pretrain --resume '
                                f'runs/{run_dir.name}'), err
    assert RG.load_registry(runs).status.tolist() == ['interrupted']
    assert not _noise(out), out
    capfd.readouterr()
    assert CLI.main(['pretrain', '--resume', str(run_dir)]) == 0       # direct, as it was started
    out = capfd.readouterr().out
    assert 'resumed from' in out and 'step 30/30' in out and not _noise(out), out
    reg = RG.load_registry(runs)
    assert reg.status.tolist() == ['completed'] and reg.steps.tolist() == [30] and len(list(runs.iterdir())) == 1
    from concept_nb.train import run_pretraining                        # the same parameters, never interrupted
    run_pretraining({'run_dir': str(tmp_path / 'ref'), 'steps': 30}, log=lambda *a: None)
    assert _history(run_dir) == _history(tmp_path / 'ref')


def test_glue_without_data_stops_before_any_work(tmp_path, monkeypatch, capsys):
    "No CONCEPT_NB_GLUE_DIR, or a folder without the tasks: one line naming the folder and how to set it, exit 2."
    monkeypatch.delenv('CONCEPT_NB_GLUE_DIR', raising=False)
    runs = tmp_path / 'runs'
    assert CLI.main(['glue', '--checkpoint', '', '--runs-dir', str(runs)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count('\n') == 0 and 'CONCEPT_NB_GLUE_DIR is not set' in err and 'export CONCEPT_NB_GLUE_DIR=' in err
    for bad in (tmp_path / 'nope', tmp_path):                   # missing folder; folder without MRPC/, STS-B/, SST-2/
        monkeypatch.setenv('CONCEPT_NB_GLUE_DIR', str(bad))
        assert CLI.main(['glue', '--checkpoint', '', '--runs-dir', str(runs)]) == 2
        err = capsys.readouterr().err.strip()
        assert err.count('\n') == 0 and str(bad) in err and 'export CONCEPT_NB_GLUE_DIR=' in err, err
    assert not runs.exists()                                     # nothing was started


def _glue_record(runs:Path, name:str, pre:Path, n_train:int, n_dev:int, f1:float, skipped=()):
    from concept_nb.glue_metrics import metrics_record
    from concept_nb.records import upgrade_record, write_record
    d = runs / f'2026-01-0{len(list(runs.iterdir()))}_{name}'
    d.mkdir()
    r = dict(task='mrpc', mode='finetune', status='completed', protocol='standard', n_train=n_train, n_train_all=3668,
             n_select=0, n_dev=n_dev, seeds=[42], headline_metric='f1', final={'f1': f1, 'accuracy': 70.0},
             majority={'f1': 81.2, 'accuracy': 68.4})
    view = metrics_record([r, *[dict(task=t, mode='finetune', status='skipped', message='no data') for t in skipped]],
                          checkpoint=str(pre / 'model'), source_run=pre.name.split('_', 1)[1])
    write_record(d, **upgrade_record(view, kind='glue'))
    (d / 'run.json').write_text(json.dumps(dict(kind='glue', run_name=name,
                                                parameters={'checkpoint': str(pre / 'model')})))
    return d


def test_subset_scores_never_replace_full_dev_scores(tmp_path):
    "A smoke GLUE run (64 train / 64 dev) after the real one: experiment log and compare keep the full-dev score, every"
    "score shows its train-subset size, and a run that skipped tasks for lack of data says so."
    from concept_nb.records import write_record
    from concept_nb.report import compare, experiment_log, headline
    runs = tmp_path / 'runs'; runs.mkdir()
    pre = runs / '2026-01-00_pre'
    write_record(pre, 'pretrain', 'completed', run_name='pre', model=dict(model_type='perceiver_mlm'),
                 train=dict(steps=20), results=dict(eval_loss=6.5))
    _glue_record(runs, 'glue-full', pre, 3668, 408, 80.2)
    _glue_record(runs, 'glue-smoke', pre, 64, 64, 0.0, skipped=('sst2',))
    reg = RG.load_registry(runs)
    assert reg.status.tolist() == ['completed'] * 3 and reg.n_dev.tolist()[1:] == [{'mrpc': 408}, {'mrpc': 64}]
    log = experiment_log(reg)
    pre_row = next(l for l in log.splitlines() if l.startswith('|') and '| pre |' in l)
    assert 'MRPC F1 80.2 (train 3668, dev 408)' in pre_row and 'F1 0.0' not in pre_row
    assert 'completed (skipped: sst2)' in log and 'MRPC F1 0 (train 64, dev 64)' in log
    assert '80.2' in compare(['pre'], runs) and ' 0.0' not in compare(['pre'], runs).split('Pretraining')[0]
    smoke = RG.read_run(runs / reg.run_id[2])
    assert 'MRPC F1 0 (majority 81.2; train 64, dev 64)' in headline(smoke) and 'sst2' in headline(smoke)


# last in the file: the console run started with the module and has been running beside the tests above
def test_console_run_is_short_and_quiet(console_run):
    ("`concept-nb pretrain` at the smoke defaults through papermill: the cells' progress lines and the record's "
     "headline,")
    "no parameter table, figure reprs, papermill notices, kernel or progress-bar warnings."
    p, log = console_run
    assert p.wait(timeout=600) == 0, log.read_text()[-3000:]
    out = log.read_text()
    # progress, the floor line, the six fill-mask probe lines and the headline: about 25 lines (it was 144)
    assert not _noise(out) and len(out.splitlines()) <= 30, out
    assert out.count('step ') >= 4 and 'completed: steps 20' in out
