"Run records, registry, experiment log, comparison and CLI of concept_nb.runs, on real papermill records."
import datetime as dt, json, math, os, re, subprocess, sys, threading, textwrap
from pathlib import Path

import nbformat, pandas as pd, papermill as pm, pytest

from concept_nb import runs as R, registry as RG, report as RP, cli as CLI
from concept_nb.core import repo_root

ROOT = repo_root(Path(__file__))

PARAMS = textwrap.dedent('''
    run_dir: str = ""  # output folder (empty: a temporary one)
    run_name: str = ""  # run name
    model_type: str = "perceiver_mlm"  # pretraining model
    hidden_size: int = 16  # H
    num_hidden_layers: int = 2  # L
    concept_num: int = 4  # C
    steps: int = 3  # training steps
    lr: float = 1e-3  # learning rate
    checkpoint: str = ""  # GLUE: pretraining run
    tasks: str = ""  # GLUE: comma-separated tasks
    concept_losses: str = "combined"  # pretraining: concept losses
    control: str = ""  # GLUE: '' or random_init
    fake_metrics: str = "{}"  # JSON merged into the metrics
    fail: bool = False  # raise in the body
''').strip()
BODY = textwrap.dedent('''
    import json, tempfile
    from pathlib import Path
    from IPython.display import display
    run_dir = Path(run_dir or tempfile.mkdtemp())
    (run_dir/"metrics.json").write_text(json.dumps(dict(status="running", steps=0)))
    if fail: raise RuntimeError("requested failure")
    (run_dir/"params.json").write_text(json.dumps(dict(params=dict(model_type=model_type, hidden_size=hidden_size,
        num_hidden_layers=num_hidden_layers, concept_num=concept_num, steps=steps, data="embedded"),
        environment=dict(hostname="testhost", device="cpu", git_commit="0"*40))))
    metrics = dict(status="completed", steps=steps, **json.loads(fake_metrics))
''').strip()
METRICS = 'display({"application/json": metrics}, raw=True)\n(run_dir/"metrics.json").write_text(json.dumps(metrics))'
PRE_METRICS = dict(eval_loss=6.5, effective_rank=2.5, mean_concept_similarity=0.4, max_concept_similarity=0.9,
                   input_dependence=0.417, steps_per_s=10.0, tokens_per_s=1280.0)
GLUE_METRICS = {'mrpc': {'f1': 80.2, 'accuracy': 68.4}, 'stsb': {'pearson': 12.5, 'spearman': 11.0}}
BASE = {'BERT-base': {'mrpc': {'f1': 89.5}, 'stsb': {'pearson': 89.4}},
        'seed L6 perceiver_mlm': {'mrpc': {'f1': 81.3, 'accuracy': 71.1}, 'stsb': {'pearson': 62.7}}}


def make_template(path):
    nb = nbformat.v4.new_notebook(metadata={'kernelspec': {'name': 'python3', 'display_name': 'python3',
                                                           'language': 'python'}})
    nb.cells = [nbformat.v4.new_markdown_cell('# Tiny run'),
                nbformat.v4.new_code_cell(PARAMS, metadata={'tags': ['parameters']}),
                nbformat.v4.new_code_cell(BODY),
                nbformat.v4.new_code_cell(METRICS, metadata={'tags': ['metrics']})]
    nbformat.write(nb, str(path))
    return Path(path)


@pytest.fixture(scope='module')
def tiny(tmp_path_factory):
    return make_template(tmp_path_factory.mktemp('tpl')/'tiny.ipynb')


@pytest.fixture(scope='module')
def records(tmp_path_factory, tiny):
    "A registry folder with a completed pretraining run, a GLUE run on it, a failed run and a half-written notebook."
    d = tmp_path_factory.mktemp('runs')
    kw = dict(template=tiny, rules={'steps': ('>=', 1)}, log_output=False)
    pre = R.run_notebook('pretrain', {'fake_metrics': json.dumps(PRE_METRICS)}, d, **kw)
    glue = R.run_notebook('glue', {'checkpoint': str(d/pre.stem), 'tasks': 'mrpc,stsb',
                                   'fake_metrics': json.dumps(GLUE_METRICS)}, d, **kw)
    with pytest.raises(R.RunFailed, match='requested failure') as e:
        R.run_notebook('pretrain', {'fail': True, 'run_name': 'broken'}, d, **kw)
    failed = e.value.record
    half = d/'2026-01-02_half_written.ipynb'
    half.write_text(pre.read_text()[:700])
    return dict(dir=d, pre=pre, glue=glue, failed=failed, half=half)


def test_registry_statuses(records):
    reg = RG.load_registry(records['dir']).set_index('run_id')
    st = reg.status.to_dict()
    assert st[records['pre'].stem] == 'completed' and st[records['glue'].stem] == 'completed'
    assert st[records['failed'].stem] == 'failed' and st['2026-01-02_half_written'] == 'incomplete'
    assert len(reg) == 4
    f = reg.loc[records['failed'].stem]
    assert 'RuntimeError: requested failure' in f.error
    assert records['failed'].exists(), 'the failed run still leaves its executed notebook'
    assert json.loads((records['dir']/records['failed'].stem/'metrics.json').read_text())['status'] == 'failed'
    assert f.model_type == 'perceiver_mlm' and f.hidden_size == 16   # declared defaults are read from the record
    p = reg.loc[records['pre'].stem]
    assert (p.kind, p.task_loss, p.effective_rank, p.steps, p.data, p.machine) == \
        ('pretrain', 6.5, 2.5, 3, 'embedded', 'cpu @ testhost')
    assert p.git_commit == '0' * 40 and p.duration_s > 0 and p.start_time < p.end_time


def test_glue_linked_to_pretraining(records):
    reg = RG.load_registry(records['dir']).set_index('run_id')
    g = reg.loc[records['glue'].stem]
    assert g.kind == 'glue' and g.source_run_id == records['pre'].stem
    assert g.glue == {('mrpc', 'f1'): 80.2, ('mrpc', 'accuracy'): 68.4, ('stsb', 'pearson'): 12.5,
                      ('stsb', 'spearman'): 11.0}
    assert records['glue'].stem.split('_', 1)[1] == f"glue-mrpc-stsb-{reg.loc[records['pre'].stem].run_name}"


def test_read_run_never_raises_on_damaged_records(tmp_path):
    (tmp_path/'2026-01-01_empty.ipynb').write_text('')
    (tmp_path/'2026-01-01_folder_only').mkdir()
    (tmp_path/'2026-01-01_folder_only'/'metrics.json').write_text('{"status": "runn')   # half-written JSON
    (tmp_path/'2026-01-01_not_papermill.ipynb').write_text(nbformat.writes(nbformat.v4.new_notebook()))
    (tmp_path/'_ignored.ipynb').write_text('')
    reg = RG.load_registry(tmp_path)
    assert list(reg.run_id) == ['2026-01-01_empty', '2026-01-01_folder_only', '2026-01-01_not_papermill']
    assert set(reg.status) == {'incomplete'}
    assert RG.load_registry(tmp_path/'missing').empty


def test_experiment_log_is_idempotent(records):
    d = records['dir']
    out = RP.write_experiment_log(d)
    first = out.read_bytes()
    assert CLI.main(['experiment-log', '--runs-dir', str(d)]) == 0
    assert out.read_bytes() == first
    text = first.decode()
    for col in ('date', 'run id', 'architecture', 'data', 'machine', 'steps', 'concept losses', 'task loss',
                'eff. rank', 'GLUE', 'speed', 'record'):
        assert f'| {col}' in text or f' {col} |' in text, col
    assert 'MRPC F1 80.2' in text and '2.5/4' in text and '10 steps/s, 1280 tok/s' in text and 'cpu @ testhost' in text
    assert f"]({records['pre'].name})" in text            # links relative to the log's folder
    assert 'requested failure' not in text or 'failed' in text


def _md_rows(text, first_col):
    "Cells of the markdown table whose header starts with `first_col`: (header, [rows]); escaped pipes kept."
    lines = text.splitlines()
    i = next(k for k, l in enumerate(lines) if l.startswith(f'| {first_col} |'))
    split = lambda l: [c.strip() for c in re.split(r'(?<!\\)\|', l.strip())[1:-1]]
    rows = []
    for l in lines[i + 2:]:
        if not l.startswith('|'): break
        rows.append(split(l))
    return split(lines[i]), rows


def test_experiment_log_input_dependence_column(records):
    """issue 14, defect 7: the experiment log shows each pretraining run's input dependence (from its metrics) in an
    "input dependence" column; records without it (written before it was logged, or failed) show it blank."""
    text = RP.experiment_log(RG.load_registry(records['dir']), rel_to=records['dir'])
    header, rows = _md_rows(text.split('## GLUE runs')[0], 'date')
    assert 'input dependence' in header, header                     # today: no such column
    by_name = {r[header.index('run id')]: r[header.index('input dependence')] for r in rows}
    assert by_name[RG.read_run(records['pre'])['run_name']] == '0.417' and by_name['broken'] == ''
    reg = RG.load_registry(records['dir']).set_index('run_id')
    assert reg.loc[records['pre'].stem, 'input_dependence'] == 0.417
    assert pd.isna(reg.loc[records['failed'].stem, 'input_dependence'])


def test_compare_has_baselines_and_deltas(records):
    name = RG.read_run(records['pre'])['run_name']
    md = RP.compare([records['pre'].stem], records['dir'], BASE)
    assert '## Results vs Baselines' in md and '## Pretraining Summary' in md
    assert f'Δ {name} vs BERT-base' in md and f'Δ {name} vs seed L6 perceiver_mlm' in md
    res, summ = RP.compare_tables([name], records['dir'], BASE)
    row = res.set_index(['task', 'metric']).loc[('MRPC', 'F1')]
    assert (row['BERT-base'], row[name], row[f'Δ {name} vs BERT-base']) == (89.5, 80.2, -9.3)
    assert summ.set_index('metric').loc['effective rank / C', name] == 2.5 / 4
    fig = RP.plot_compare([name], records['dir'], BASE)
    assert len(fig.axes[0].patches) == 3 * len(res)       # one bar per series and task metric


def test_compare_uses_package_baselines(records):
    base = RP.glue_baselines()
    if not base: pytest.skip('concept_nb.glue_metrics has no baseline table yet')
    assert any('bert' in n.lower() for n in base)
    md = RP.compare([records['glue'].stem], records['dir'])
    assert 'BERT' in md and 'Δ ' in md


def _cli(*args, cwd=ROOT):
    env = {**os.environ, 'WANDB_MODE': 'disabled', 'MPLBACKEND': 'Agg'}
    return subprocess.run([sys.executable, '-m', 'concept_nb.runs', *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=600)


def test_cli_bad_parameter_exits_2(tiny, tmp_path):
    r = _cli('pretrain', '--template', str(tiny), '-p', 'stpes', '5', '--runs-dir', str(tmp_path))
    assert r.returncode == 2, r.stderr
    err = r.stderr.strip().splitlines()
    assert len(err) == 1 and "'stpes'" in err[0] and "did you mean 'steps'" in err[0]
    assert not any(tmp_path.iterdir()), 'nothing is created before the parameters are valid'
    assert CLI.main(['pretrain', '--template', str(tiny), '-p', 'lr', 'fast', '--runs-dir', str(tmp_path)]) == 2
    assert (CLI.main(['pretrain', '--template', str(tiny), '--preset', 'no-such-preset', '--runs-dir', str(tmp_path)])
            == 2)


def test_cli_real_template_bad_parameter(tmp_path):
    tpl = ROOT/'nbs'/'90_pretrain.ipynb'
    if not tpl.exists(): pytest.skip('nbs/90_pretrain.ipynb not written yet')
    decl = R.declared_params(tpl)
    assert 'steps' in decl or 'max_steps' in decl
    good = 'steps' if 'steps' in decl else 'max_steps'
    r = _cli('pretrain', '-p', good[:-1] + 'x', '3', '--runs-dir', str(tmp_path))
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1 and f"'{good}'" in r.stderr
    # cross-parameter rules of the template (more concepts than tokens) also fail before any work
    assert (CLI.main(['pretrain', '-p', 'concept_num', '100', '-p', 'block_size', '64', '--runs-dir', str(tmp_path)])
            == 2)
    if (ROOT/'nbs'/'91_glue.ipynb').exists():
        assert CLI.main(['glue', '--checkpoint', 'runs/no_such_run', '--runs-dir', str(tmp_path)]) == 2
        assert CLI.main(['glue', '--checkpoint', '', '--tasks', 'mrpcc', '--runs-dir', str(tmp_path)]) == 2
    assert not any(tmp_path.iterdir())


def test_cli_failed_run_exits_1_with_record(tiny, tmp_path):
    r = _cli('pretrain', '--template', str(tiny), '-p', 'fail', 'True', '-r', 'run_name', '007', '--runs-dir',
             str(tmp_path))
    assert r.returncode == 1
    line = r.stderr.strip().splitlines()[-1]
    assert 'RuntimeError: requested failure' in line and 'record:' in line
    rec = next(tmp_path.glob('*_007.ipynb'))            # -r keeps '007' a string
    assert RG.read_run(rec)['status'] == 'failed'
    assert json.loads((tmp_path/rec.stem/'run.json').read_text())['parameters']['fail'] is True


def test_unique_run_dirs_same_name_same_second(tiny, tmp_path):
    got = []
    ts = [threading.Thread(target=lambda: got.append(R.reserve_run_dir(tmp_path, 'same', '2026-02-08')))
          for _ in range(8)]
    for t in ts: t.start()
    for t in ts: t.join()
    assert len({d for d, _ in got}) == 8 and {n for _, n in got} == {'same', *(f'same-{i}' for i in range(2, 9))}
    now = dt.datetime(2026, 2, 8, 21, 16, 33)
    kw = dict(template=tiny, rules={}, log_output=False, now=now)
    a = R.run_notebook('pretrain', {}, tmp_path/'r', **kw)
    b = R.run_notebook('pretrain', {}, tmp_path/'r', **kw)
    assert a != b and a.exists() and b.exists()
    assert a.name == '2026-02-08_perceiver_mlm_H16L2C4_20260208_211633.ipynb'
    assert b.name == '2026-02-08_perceiver_mlm_H16L2C4_20260208_211633-2.ipynb'
    assert RG.read_run(b)['parameters']['run_dir'].endswith(b.stem)


def test_records_keep_figures_under_agg(tmp_path, monkeypatch):
    nb = nbformat.v4.new_notebook(metadata={'kernelspec': {'name': 'python3', 'display_name': 'python3',
                                                           'language': 'python'}})
    nb.cells = [nbformat.v4.new_code_cell('run_dir: str = ""\nrun_name: str = ""', metadata={'tags': ['parameters']}),
                nbformat.v4.new_code_cell('import matplotlib.pyplot as plt\nplt.plot([1, 2, 3]);')]
    nbformat.write(nb, str(tmp_path/'plot.ipynb'))
    monkeypatch.setenv('MPLBACKEND', 'Agg')
    rec = R.run_notebook('pretrain', {}, tmp_path/'runs', template=tmp_path/'plot.ipynb', rules={}, log_output=False)
    out = nbformat.read(str(rec), as_version=4)
    assert any('image/png' in o.get('data', {}) for c in out.cells for o in c.get('outputs', []))
    assert os.environ['MPLBACKEND'] == 'Agg'
    assert RG.read_run(rec)['status'] == 'completed'      # no metrics cell, but run_notebook records the status


def test_report_notebook_runs_on_test_records(records, tmp_path):
    out = tmp_path/'report.ipynb'
    pm.execute_notebook(str(ROOT/'nbs'/'92_report.ipynb'), str(out), parameters={'runs_dir': str(records['dir'])},
                        kernel_name='python3', cwd=str(ROOT/'nbs'), progress_bar=False)
    nb = nbformat.read(str(out), as_version=4)
    text = json.dumps([c.get('outputs', []) for c in nb.cells])
    assert '4 records' in text and 'Experiment log' in text and 'Results vs Baselines' in text
    # even under MPLBACKEND=Agg
    assert sum('image/png' in o.get('data', {}) for c in nb.cells for o in c.get('outputs', [])) >= 2
    empty = tmp_path/'empty'; empty.mkdir()
    pm.execute_notebook(str(ROOT/'nbs'/'92_report.ipynb'), str(tmp_path/'empty.ipynb'),
                        parameters={'runs_dir': str(empty)},
                        kernel_name='python3', cwd=str(ROOT/'nbs'), progress_bar=False)


def _fake_runner(monkeypatch, tiny, calls):
    real = R.run_notebook
    def fake(kind, params=None, runs_dir='runs', preset=None, **kw):
        # papermill moves the process into the notebook's folder while a run executes: a relative folder given to a
        # second thread's run would land there (the bert_mlm GLUE record of `main` went to nbs/runs/)
        assert Path(runs_dir).is_absolute(), runs_dir
        calls.append((kind, dict(params or {}), preset))
        extra = {'fake_metrics': json.dumps(PRE_METRICS if kind == 'pretrain' else GLUE_METRICS)}
        return real(kind, {**(params or {}), **extra}, runs_dir, None, template=tiny, rules={}, log_output=False)
    monkeypatch.setattr(CLI, 'run_notebook', fake)   # the command line's own name


def test_available_glue_tasks(monkeypatch, tmp_path):
    monkeypatch.delenv('CONCEPT_NB_GLUE_DIR', raising=False)
    assert CLI.available_glue_tasks() == ([], None)
    monkeypatch.setenv('CONCEPT_NB_GLUE_DIR', str(tmp_path))
    assert CLI.available_glue_tasks()[0] == []
    for t in ('MRPC', 'SST-2'):
        (tmp_path/t).mkdir(); (tmp_path/t/'train.tsv').write_text('x'); (tmp_path/t/'dev.tsv').write_text('x')
    assert CLI.available_glue_tasks() == (['mrpc', 'sst2'], tmp_path)


def test_main_without_glue_data_says_how(monkeypatch, tmp_path, tiny, capsys):
    calls = []
    _fake_runner(monkeypatch, tiny, calls)
    monkeypatch.delenv('CONCEPT_NB_GLUE_DIR', raising=False)
    monkeypatch.chdir(tmp_path)
    assert CLI.main(['main', '--runs-dir', 'runs']) == 0
    assert len(list((tmp_path/'runs').glob('*.ipynb'))) == 2
    out = capsys.readouterr().out
    # the preset's concept model (its model_type left to the preset) and the shape-matched BERT, no concept loss
    assert sorted(calls, key=str) == [('pretrain', {'concept_losses': 'none'}, 'cpu-small'),
                                      ('pretrain', {'model_type': 'bert_mlm', 'concept_losses': 'none'}, 'cpu-small')]
    assert 'GLUE step skipped: CONCEPT_NB_GLUE_DIR is not set' in out and 'export CONCEPT_NB_GLUE_DIR=' in out
    assert 'experiment log' in out and (tmp_path/'runs'/'EXPERIMENT_LOG.md').exists()
    summary = out[out.index('[3/3] summary'):]
    assert summary.count('6.500') == 2 and 'no context-free floor in its record' in summary   # both rows, no verdict


def test_main_runs_glue_on_both_checkpoints_and_their_controls(monkeypatch, tmp_path, tiny, capsys):
    calls = []
    _fake_runner(monkeypatch, tiny, calls)
    glue = tmp_path/'glue'
    for t in ('MRPC', 'STS-B'):
        (glue/t).mkdir(parents=True); (glue/t/'train.tsv').write_text('x'); (glue/t/'dev.tsv').write_text('x')
    monkeypatch.setenv('CONCEPT_NB_GLUE_DIR', str(glue))
    monkeypatch.setitem(globals(), 'GLUE_METRICS', dict(final={'mrpc/f1': 80.2, 'stsb/pearson': 12.5},
                                                        majority={'mrpc/f1': 81.2}))   # a GLUE record's own layout
    assert CLI.main(['main', '--runs-dir', str(tmp_path/'runs'), '-p', 'steps', '5']) == 0
    pre = [p for k, p, _ in calls if k == 'pretrain']
    gl = [(p, g) for k, p, g in calls if k == 'glue']
    assert len(pre) == 2 and all(p['steps'] == 5 for p in pre) and len(gl) == 4   # the same budget for both models
    reg = RG.load_registry(tmp_path/'runs')
    runs = set(reg[reg.kind == 'pretrain'].run_dir)
    assert {p['checkpoint'] for p, _ in gl} == runs and all(p['tasks'] == 'mrpc,stsb' for p, _ in gl)
    assert sorted(p.get('control', '') for p, _ in gl) == ['', '', 'random_init', 'random_init']
    assert {g for _, g in gl} == {'glue-main'}
    out = capsys.readouterr().out
    summary = out[out.index('[3/3] summary'):]
    assert 'concept (random init)' in summary and 'bert_mlm (random init)' in summary, summary
    assert summary.count('80.2') == 4 and '81.2' in summary and 'MRPC f1' in summary


def test_main_failed_pretraining_still_logs(monkeypatch, tmp_path, tiny, capsys):
    real = R.run_notebook
    monkeypatch.setattr(CLI, 'run_notebook', lambda kind, params=None, runs_dir='runs', preset=None, **kw:
                        real(kind, {'fail': True}, runs_dir, None, template=tiny, rules={}, log_output=False))
    assert CLI.main(['main', '--runs-dir', str(tmp_path)]) == 1
    captured = capsys.readouterr()
    assert 'requested failure' in captured.err and len(captured.err.strip().splitlines()) == 1
    assert 'failed' in (tmp_path/'EXPERIMENT_LOG.md').read_text() and 'records: ' in captured.out


def test_registry_reads_direct_keys_never_the_train_loss(tmp_path):
    "A record without a held-out loss shows a blank task loss (the name-guessing registry showed its train loss)."
    d = tmp_path / 'runs' / '2026-01-01_no-eval'
    d.mkdir(parents=True)
    (d / 'metrics.json').write_text(json.dumps(dict(status='completed', steps=5, train_loss=3.25, loss=3.25)))
    (d / 'run.json').write_text(json.dumps(dict(kind='pretrain', run_name='no-eval',
                                                parameters=dict(hidden_size=16, concept_num=4))))
    r = RG.read_run(d)
    assert r['kind'] == 'pretrain' and r['task_loss'] is None
    assert (r['steps'], r['hidden_size'], r['concept_num']) == (5.0, 16, 4)
    (d / 'metrics.json').write_text(json.dumps(dict(status='completed', steps=5, train_loss=3.25, eval_loss=4.5)))
    assert RG.read_run(d)['task_loss'] == 4.5


def test_compare_out_writes_report_bars_and_curves(tmp_path, capsys):
    "`compare --out` on two pretraining runs: the report with the floor distance ± SE, the bars, and both held-out"
    "curves with their floors in one figure."
    from concept_nb.records import write_record
    runs = tmp_path/'runs'
    for i, (name, gap) in enumerate((('concept', 0.04), ('bert', 0.2))):
        d = runs/f'2026-01-0{i + 1}_{name}'
        write_record(d, 'pretrain', 'completed', run_name=name, model=dict(model_type=name), train=dict(steps=10),
                     results=dict(eval_loss=6.5, eval_mlm_loss_masked=6.9 - gap, eval_mlm_loss_masked_se=0.01,
                                  below_floor_masked=gap, below_floor_masked_se=0.01))
        (d/'run.json').write_text(json.dumps(dict(kind='pretrain', run_name=name, resolved={'model_type': name})))
        rows = [dict(kind='eval', step=s, eval_mlm_loss_masked=8 - s / 10 - gap, eval_mlm_loss_masked_se=.01,
                     floor_masked=6.9) for s in (0, 5, 10)]
        (d/'history.jsonl').write_text(''.join(json.dumps(r) + '\n' for r in rows))
    out = tmp_path/'cmp.md'
    assert CLI.main(['compare', 'concept', 'bert', '--runs-dir', str(runs), '--out', str(out)]) == 0
    assert out.is_file() and out.with_suffix('.png').is_file() and (tmp_path/'cmp-curves.png').is_file()
    md = out.read_text()
    assert 'below context-free floor (nats)' in md and '0.04 ± 0.01' in md and '0.2 ± 0.01' in md, md
    assert 'cmp-curves.png' in capsys.readouterr().out


def test_experiment_log_shows_diffusion_bounds(tmp_path):
    "A diffusion LM's held-out bound in the log, named for what it bounds, ± its SE, in nats and bits; blank for MLM."
    from concept_nb.records import write_record
    from concept_nb.report import experiment_log
    runs = tmp_path/'runs'
    write_record(runs/'2026-01-01_lm', 'pretrain', 'completed', run_name='lm', model=dict(model_type='diffusion_lm'),
                 results=dict(eval_loss=5.2, bound_name='nelbo', heldout_bound_nats=5.1234, heldout_bound_se=0.0042,
                              heldout_bound_bits_per_token=5.1234 / math.log(2)))
    write_record(runs/'2026-01-02_mlm', 'pretrain', 'completed', run_name='mlm', model=dict(model_type='perceiver_mlm'),
                 results=dict(eval_loss=6.5))
    log = experiment_log(RG.load_registry(runs))
    assert 'held-out bound (diffusion LMs)' in log
    lm = next(l for l in log.splitlines() if '| lm |' in l)
    assert 'nelbo 5.123 ± 0.004 nats (7.392 bits)' in lm, lm
    assert 'nats' not in next(l for l in log.splitlines() if '| mlm |' in l)
