("Integration tests of concept_nb.train: exact resume, non-finite stop, 2-process DDP, "
 "the CLI and the papermill run notebook.")
import json, os, shutil, subprocess, sys, textwrap
from pathlib import Path
import pytest, torch
import nbformat
from concept_nb.core import ParamError
from concept_nb.heads import load_model
from concept_nb.checkpoints import latest_checkpoint, list_checkpoints, resume_point
from concept_nb.pretrain import PRETRAIN_DEFAULTS, build_pretraining, list_presets, load_preset, resolve_params
from concept_nb.train import NonFiniteLossError, TrainConfig, run_pretraining, train
from concept_nb.registry import load_registry

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
torch.set_num_threads(1)
os.environ.setdefault('WANDB_MODE', 'disabled')

TINY = dict(hidden_size=32, concept_num=4, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64,
            block_size=32, batch_size=4, max_docs=40, eval_max_docs=10, lr=3e-3, warmup_steps=2, steps=8, log_every=1,
            eval_every=4, eval_batches=2, save_every=4, wandb_mode='disabled', device='cpu', seed=7)


def _params(tmp, name, **kw):
    return resolve_params({**TINY, 'run_dir': str(tmp / name), **kw}, log=lambda *a: None)


def _run(P, **cfg):
    model, tok, tr, ev, lm = build_pretraining(P, log=lambda *a: None)
    h = train(model, tr, ev, lm, TrainConfig.from_params({**P, **cfg}), P['run_dir'], tok, log=lambda *a: None)
    return h, model, lm


def _losses(h, kind='train', key='loss'):
    return {r['step']: r[key] for r in h.of(kind)}


def _same(a, b):
    "Exact equality, or within 1e-6 (the contract), for every step."
    assert a.keys() == b.keys(), (sorted(a), sorted(b))
    bad = {s: (a[s], b[s]) for s in a if not (a[s] == b[s] or abs(a[s] - b[s]) <= 1e-6)}
    assert not bad, bad


@pytest.mark.parametrize('setup', [
    dict(concept_losses='combined', loss_weighting='kendall_gal', grad_accum=2),
    dict(model_type='tsdae_posonly', objective='tsdae', concept_losses='none'),
    dict(model_type='diffusion_mlm', objective='diffusion', concept_losses='variance'),
    dict(model_type='diffusion_mlm', objective='prefix_diffusion', concept_losses='none', use_bixt=True),
])
def test_resume_reproduces_every_later_loss(tmp_path, setup):
    P = _params(tmp_path, 'full', **setup)
    full, m_full, lm_full = _run(P)
    assert [r['step'] for r in full.of('train')] == list(range(1, 9))
    # 1) kill-free: resume from the uninterrupted run's step-4 checkpoint into another folder
    P2 = _params(tmp_path, 'resumed', **setup)
    h2, _, _ = _run(P2, resume_from=str(Path(P['run_dir']) / 'checkpoints' / 'step-4'))
    _same({s: v for s, v in _losses(full).items() if s > 4}, _losses(h2))
    _same({s: v for s, v in _losses(full, 'train', 'task_loss').items() if s > 4}, _losses(h2, 'train', 'task_loss'))
    _same({s: v for s, v in _losses(full, 'eval', 'eval_loss').items() if s > 4}, _losses(h2, 'eval', 'eval_loss'))
    # 2) interrupted after step 6 before its checkpoint was written: resume 'latest' (step 4) in the same folder
    P3 = _params(tmp_path, 'crashed', **setup)
    _run(P3, stop_after=6)
    shutil.rmtree(Path(P3['run_dir']) / 'checkpoints' / 'step-6')          # as if killed while/before saving step 6
    assert latest_checkpoint(P3['run_dir']).name == 'step-4'
    h3, m3, lm3 = _run(P3, resume_from='latest')
    _same(_losses(full), _losses(h3))                                   # records 1-4 from history.jsonl, 5-8 recomputed
    recs = [json.loads(l) for l in (Path(P3['run_dir']) / 'history.jsonl').read_text().splitlines()]
    assert [r['step'] for r in recs if r['kind'] == 'train'] == list(range(1, 9))   # no duplicate steps 5, 6
    for a, b in zip([*m_full.parameters(), *lm_full.parameters()], [*m3.parameters(), *lm3.parameters()]):
        assert torch.equal(a, b)


def test_dataloader_workers_give_the_same_batches(tmp_path):
    P = _params(tmp_path, 'w', objective='mlm', num_workers=2)
    _, _, tr, _, _ = build_pretraining(P, log=lambda *a: None)
    it = tr.iterate(start=3, rank=1, world=2)
    try:
        for g in range(3, 7):
            b = next(it)
            assert all(torch.equal(b[k], tr.batch(g, 1, 2)[k]) for k in b), g
    finally: it.close()


def test_incomplete_checkpoint_is_ignored(tmp_path):
    P = _params(tmp_path, 'run', steps=4, eval_every=0, save_every=2)
    _run(P)
    ck = Path(P['run_dir']) / 'checkpoints'
    (ck / 'step-4' / 'COMPLETE').unlink()                                   # a save that never finished
    assert [p.name for p in list_checkpoints(P['run_dir'])] == ['step-2']
    with pytest.raises(FileNotFoundError, match='incomplete checkpoint'): resume_point(str(ck / 'step-4'))
    with pytest.raises(FileNotFoundError, match='no complete checkpoint'): resume_point(str(tmp_path))


def test_nonfinite_loss_stops_with_step_and_checkpoint(tmp_path):
    P = _params(tmp_path, 'nan', lr=1e6, max_grad_norm=0.0, steps=30, save_every=1, eval_every=0, warmup_steps=0)
    with pytest.raises(NonFiniteLossError) as ei: _run(P)
    e = ei.value
    assert e.step >= 2 and f'at step {e.step}' in str(e)
    assert Path(e.checkpoint).name == f'step-{e.step - 1}' and str(e.checkpoint) in str(e)
    recs = [json.loads(l) for l in (Path(P['run_dir']) / 'history.jsonl').read_text().splitlines()]
    assert recs[-1]['kind'] == 'error' and recs[-1]['step'] == e.step
    # through run_pretraining the record says 'failed', with the error and the last good checkpoint
    P2 = {**TINY, 'run_dir': str(tmp_path / 'nan2'), 'lr': 1e6, 'max_grad_norm': 0.0, 'steps': 30, 'save_every': 1,
          'eval_every': 0, 'warmup_steps': 0}
    with pytest.raises(NonFiniteLossError): run_pretraining(P2, log=lambda *a: None)
    m = json.loads((tmp_path / 'nan2' / 'metrics.json').read_text())
    assert m['status'] == 'failed' and 'non-finite' in m['error'] and m['checkpoint'].endswith(f"step-{m['step'] - 1}")


DDP_SCRIPT = textwrap.dedent('''
    import json, sys, torch
    from pathlib import Path
    from accelerate import PartialState
    from concept_nb.pretrain import resolve_params, build_pretraining
    from concept_nb.train import train, TrainConfig
    out = Path(sys.argv[1])
    state = PartialState(cpu=True)
    P = resolve_params(dict(hidden_size=32, concept_num=4, num_hidden_layers=1, num_attention_heads=2,
                            intermediate_size=64, block_size=32, batch_size=4, max_docs=40, eval_max_docs=10, lr=3e-3,
                            steps=6, log_every=1, eval_every=3, eval_batches=2, save_every=3, grad_accum=2,
                            use_bixt=True, concept_losses='combined', loss_weighting='kendall_gal',
                            wandb_mode='disabled', device='cpu', run_dir=str(out / 'run'), run_name='ddp'),
                       log=lambda *a: None)
    model, tok, tr, ev, lm = build_pretraining(P, log=lambda *a: None)
    h = train(model, tr, ev, lm, TrainConfig.from_params(P), P['run_dir'], tok, log=lambda *a: None)
    params = torch.cat([q.detach().flatten() for q in [*model.parameters(), *lm.parameters()]])
    first = tr.indices(0, state.process_index, state.num_processes)
    json.dump(dict(rank=state.process_index, world=state.num_processes, params=params.tolist(), first_rows=first,
                   losses={r['step']: r['loss'] for r in h.of('train')},
                   eval={r['step']: r['eval_loss'] for r in h.of('eval')},
                   rank_eff={r['step']: r['concept/effective_rank'] for r in h.of('eval')}),
              open(out / f'rank{state.process_index}.json', 'w'))
''')


def test_two_process_ddp_ranks_agree(tmp_path):
    (tmp_path / 'ddp.py').write_text(DDP_SCRIPT)
    env = {**os.environ, 'OMP_NUM_THREADS': '1', 'WANDB_MODE': 'disabled', 'TOKENIZERS_PARALLELISM': 'false'}
    r = subprocess.run([str(BIN / 'torchrun'), '--standalone', '--nproc_per_node', '2', str(tmp_path / 'ddp.py'),
                        str(tmp_path)], capture_output=True, text=True, timeout=240, env=env, cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-4000:]
    a, b = [json.loads((tmp_path / f'rank{i}.json').read_text()) for i in (0, 1)]
    assert (a['world'], b['world']) == (2, 2)
    assert set(a['first_rows']).isdisjoint(b['first_rows'])               # each process reads its own rows
    assert a['losses'] == b['losses'] and list(a['losses']) == [str(s) for s in range(1, 7)]
    assert a['eval'] == b['eval'] and a['rank_eff'] == b['rank_eff']
    assert a['params'] == b['params']                                   # DDP kept the replicas (and loss weights) equal
    ck = tmp_path / 'run' / 'checkpoints' / 'step-6'
    assert (ck / 'COMPLETE').exists() and (ck / 'rng_state_0.pt').exists() and (ck / 'rng_state_1.pt').exists()


def _console_script(tmp_path) -> Path:
    "A folder holding the `concept-nb` console script as pip writes it from settings.ini (an older venv's may differ)."
    import configparser
    cfg = configparser.ConfigParser(); cfg.read(ROOT / 'settings.ini')
    name, target = cfg['DEFAULT']['console_scripts'].split('=')
    mod, fn = target.split(':')
    b = tmp_path / 'bin'; b.mkdir()
    (b / name).write_text(f"#!{sys.executable}\nimport sys\nfrom {mod} import {fn}\nsys.exit({fn}())\n")
    (b / name).chmod(0o755)
    return b


def test_torchrun_concept_nb_pretrain_writes_run_record(tmp_path):
    "`torchrun --nproc_per_node 2 --no-python concept-nb pretrain ...`: both processes train, rank 0 writes the record."
    env = {**os.environ, 'PATH': f"{_console_script(tmp_path)}{os.pathsep}{os.environ['PATH']}", 'OMP_NUM_THREADS': '1',
           'WANDB_MODE': 'disabled', 'TOKENIZERS_PARALLELISM': 'false'}
    runs = tmp_path / 'runs'
    args = ['--preset', 'smoke', '--runs-dir', str(runs), '-p', 'steps', '6', '-p', 'eval_every', '3', '-p', 'lr',
            '3e-3',
            '-p', 'wandb_mode', 'disabled', '-p', 'max_docs', '40', '-p', 'device', 'cpu']
    r = subprocess.run([str(BIN / 'torchrun'), '--standalone', '--nproc_per_node', '2', '--no-python', 'concept-nb',
                        'pretrain', *args], capture_output=True, text=True, timeout=300, env=env, cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-4000:]
    run = next(runs.iterdir())
    m = json.loads((run / 'metrics.json').read_text())
    assert m['status'] == 'completed' and m['train']['steps'] == 6 and m['schema'] == 2
    assert r.stdout.count('pretraining record:') == 1                       # rank 0 prints the record, once
    reg = load_registry(runs)                                               # `write_record`'s record, read as completed
    assert (reg.run_id.tolist(), reg.status.tolist(), reg.kind.tolist(), reg.steps.tolist()) == \
        ([run.name], ['completed'], ['pretrain'], [6])
    p = json.loads((run / 'params.json').read_text())
    assert p['params']['preset'] == 'smoke' and p['params']['lr'] == 3e-3 and p['model_config']['concept_num'] == 8
    model = load_model(run / 'model')
    assert type(model).__name__ == 'ConceptEncoderForMaskedLM' and (run / 'model' / 'tokenizer.json').exists()
    assert (run / 'log.txt').read_text().count('step ') >= 2
    assert not list(runs.glob('*.ipynb')) and not list(tmp_path.glob('*.ipynb'))   # direct: no papermill record


def test_params_validation_and_presets():
    with pytest.raises(ParamError, match="did you mean 'steps'"): run_pretraining({'stepz': 3})
    with pytest.raises(ParamError, match='cannot learn objective'): resolve_params(dict(model_type='diffusion_mlm'))
    assert ({'smoke', 'cpu-small', 'upstream-l6-canonical', 'upstream-l6-kendall-gal', 'upstream-l6-fixed01'}
            <= set(list_presets()))
    for name in list_presets():
        P = resolve_params(dict(preset=name, run_dir='/nonexistent/not-created'), log=lambda *a: None)
        assert P['concept_num'] < P['block_size']
    c = load_preset('upstream-l6-canonical')
    assert (c['model_type'], c['hidden_size'], c['num_hidden_layers'], c['concept_num'], c['intermediate_size']) == \
        ('perceiver_mlm', 512, 6, 128, 2048)
    assert (c['lr'], c['warmup_steps'], c['schedule'], c['batch_size'], c['grad_accum'], c['block_size']) == \
        (3e-4, 3000, 'linear', 64, 2, 512)
    assert c['tokenizer'] == 'answerdotai/ModernBERT-base' and c['data'] == 'JeanKaddour/minipile'
    for n in ('upstream-l6-kendall-gal', 'upstream-l6-fixed01'):
        d = load_preset(n)
        assert (d['concept_losses'], d['schedule'], d['warmup_steps']) == ('combined', 'cosine', 1500)
    assert load_preset('upstream-l6-kendall-gal')['loss_weighting'] == 'kendall_gal'
    assert ((load_preset('upstream-l6-fixed01')['loss_weighting'], load_preset('upstream-l6-fixed01')['loss_weight'])
            == ('fixed', 0.1))
    # explicit values win over the preset; values left at the default take the preset's
    P = resolve_params(dict(preset='cpu-small', steps=7, run_dir='/nonexistent/x'), log=lambda *a: None)
    assert P['steps'] == 7 and P['hidden_size'] == load_preset('cpu-small')['hidden_size']


@pytest.mark.parametrize('notebook, module, specs', [('90_pretrain', 'pretrain', 'PRETRAIN_SPECS'),
                                                     ('91_glue', 'glue', 'GLUE_SPECS')])
def test_notebook_parameters_are_the_defaults(notebook, module, specs):
    ("The literal papermill cell of each run notebook equals its params dataclass: names (in order), types, defaults, "
     "help.")
    import importlib, papermill as pm
    specs = getattr(importlib.import_module(f'concept_nb.{module}'), specs)
    declared = pm.inspect_notebook(str(ROOT / 'nbs' / f'{notebook}.ipynb'))
    assert list(declared) == list(specs)
    for k, v in declared.items():
        assert eval(v['default']) == specs[k]['default'], k
        assert v['inferred_type_name'] == specs[k]['type'], k
        assert v['help'] and v['help'] == specs[k]['help'], f'parameter {k}: help differs or is empty'


def test_derived_parameter_tables():
    "Defaults, types and rules of both run kinds derive from their dataclass (one declaration per parameter)."
    from concept_nb import glue as G, pretrain as PT
    for name in ('PRETRAIN', 'GLUE'):
        specs = getattr(PT if name == 'PRETRAIN' else G, f'{name}_SPECS')
        defaults, types, rules = (getattr(PT if name == 'PRETRAIN' else G, f'{name}_{t}')
                                  for t in ('DEFAULTS', 'TYPES', 'RULES'))
        assert defaults == {k: d['default'] for k, d in specs.items()}, name
        assert types == {k: d['type'] for k, d in specs.items()}, name
        assert rules == {k: d['rule'] for k, d in specs.items() if d['rule'] is not None}, name


def test_one_default_per_parameter():
    "Issue 15: TrainConfig took lr 1e-3 and wandb 'disabled' while the run notebook said 2e-3 and 'offline'."
    from concept_nb.pretrain import PretrainParams, PRETRAIN_RULES
    cfg, p = TrainConfig(), PretrainParams()
    for k in ('lr', 'wandb_mode', 'steps', 'warmup_steps', 'eval_every', 'save_every', 'log_every', 'cpu_threads'):
        assert getattr(cfg, k) == getattr(p, k) == PRETRAIN_DEFAULTS[k], k
    assert PRETRAIN_RULES['lr'] == ('>', 0)
    with pytest.raises(ValueError, match="'lr' must be > 0"): TrainConfig(lr=0.)


def test_papermill_run_notebook(tmp_path):
    import papermill as pm
    run, out = tmp_path / 'run', tmp_path / 'record.ipynb'
    pm.execute_notebook(str(ROOT / 'nbs' / '90_pretrain.ipynb'), str(out), kernel_name='python3', cwd=str(ROOT / 'nbs'),
                        progress_bar=False,
                        parameters=dict(run_dir=str(run), steps=8, eval_every=4, save_every=4, log_every=2,
                                        concept_losses='orthogonality', loss_weighting='kendall_gal',
                                        wandb_mode='disabled'))
    m = json.loads((run / 'metrics.json').read_text())
    assert (m['status'] == 'completed' and m['train']['steps'] == 8
            and m['results']['eval_loss'] < m['results']['eval_loss_start'])
    nb = nbformat.read(str(out), as_version=4)
    cell = [c for c in nb.cells if 'metrics' in c.metadata.get('tags', [])]
    assert len(cell) == 1 and cell[0] is nb.cells[-1]
    shown = [o['data']['application/json'] for o in cell[0].outputs if 'application/json' in o.get('data', {})]
    assert shown == [m]
    assert nb.metadata.papermill.parameters['steps'] == 8
    for f in ('params.json', 'history.jsonl', 'log.txt', 'config.json', 'model/model.safetensors',
              'model/tokenizer.json',
              'figures/loss_curves.png', 'figures/training_dynamics.png', 'figures/similarity_heatmap.png',
              'figures/svd_spectrum.png', 'checkpoints/step-8/COMPLETE'):
        assert (run / f).exists(), f
    hist = [json.loads(l) for l in (run / 'history.jsonl').read_text().splitlines()]
    assert [r['step'] for r in hist if r['kind'] == 'eval'] == [0, 4, 8]
    assert any('weight/orthogonality' in r for r in hist if r['kind'] == 'train')


def test_log_line_names_clamped_log_variances():
    "issue 14, defect 2: the training log line names each log-variance that sat at its clamp, with the share of steps."
    from concept_nb.train import _fmt_log
    r = dict(step=10, loss=1.0, task_loss=1.2, lr=1e-3, grad_norm=0.5, tokens_per_s=100., steps_per_s=2.,
             **{'clamped/task': 0.0, 'clamped/variance': 0.25})
    assert _fmt_log(r, 100).endswith('| log-variance at its clamp: variance 25%')
    assert 'clamp' not in _fmt_log({**r, 'clamped/variance': 0.0}, 100)


def test_refused_loss_weighting_pair_is_a_param_error(tmp_path):
    "issue 14, defect 2: `learnable` with a concept loss is refused before any run folder exists."
    with pytest.raises(ParamError, match="weighting 'learnable' refuses concept losses"):
        resolve_params(dict(concept_losses='t_regs_mst', loss_weighting='learnable'), runs_dir=tmp_path)
    assert not list(tmp_path.iterdir())
