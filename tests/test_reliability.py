"""Reliability guarantees of issue 11: bad parameters stop a run before any work, a killed run never loses its last
checkpoint, corrupt inputs fail loudly and by name, nothing executes code from a checkpoint or a data file, runs are
deterministic, and run ids are unique.

Tests marked `xfail(strict=True)` state a guarantee that does not hold yet; their `reason` says where and how to fix it.
When the fix lands, the test XPASSes, which fails the suite until the mark is removed."""
from __future__ import annotations
import ast, csv, json, multiprocessing as mp, os, re, shutil, signal, subprocess, sys, tempfile, textwrap, time
from collections import namedtuple
from pathlib import Path

import nbformat, pytest, torch
from hypothesis import HealthCheck, given, settings, strategies as st
from safetensors.torch import save_file

import concept_nb.train as T
import concept_nb.pretrain as PT
import concept_nb.checkpoints as CK
from concept_nb import glue as G
from concept_nb import runs as R, registry as RG, report as RP, cli as CLI
from concept_nb.collators import (DiffusionCollator, IGNORE_INDEX, MaskedReconstructionCollator, MLMCollator,
                                  PrefixDiffusionCollator, TSDAECollator)
from concept_nb.core import ParamError, atomic_write_json, atomic_write_text, parse_value
from concept_nb.data import load_text, load_tokenizer, pack_documents
from concept_nb.heads import (ConceptEncoderForMaskedLM, build_model, classifier_from_pretrained, load_model,
                              read_state_dict)
from concept_nb.losses import LossConfig, LossManager

ROOT = Path(__file__).resolve().parents[1]
NBS = ROOT / 'nbs'
PY = sys.executable
ENV = {**os.environ, 'WANDB_MODE': 'disabled', 'MPLBACKEND': 'Agg', 'OMP_NUM_THREADS': '1',
       'TOKENIZERS_PARALLELISM': 'false'}
os.environ.setdefault('WANDB_MODE', 'disabled')
torch.set_num_threads(1)
QUIET = lambda *a, **k: None
TEMPLATES = {'pretrain': NBS / '90_pretrain.ipynb', 'glue': NBS / '91_glue.ipynb'}


# ======================================================================================================================
# Parameters: every bad input is rejected by the run notebook, the package entry point and the CLI before any work
# ======================================================================================================================
Case = namedtuple('Case', 'id kind params culprit expect')
C = Case
BAD_PARAMS = [
    # unknown names: the message suggests the nearest valid one
    C('P-unknown-lrr', 'pretrain', dict(lrr=0.1), 'lrr', r"did you mean 'lr'"),
    C('P-unknown-stepz', 'pretrain', dict(stepz=5), 'stepz', r"did you mean 'steps'"),
    C('P-unknown-concept_nums', 'pretrain', dict(concept_nums=4), 'concept_nums', r"did you mean 'concept_num'"),
    C('P-unknown-modeltype', 'pretrain', dict(modeltype='perceiver_mlm'), 'modeltype', r"did you mean 'model_type'"),
    C('P-unknown-batchsize', 'pretrain', dict(batchsize=8), 'batchsize', r"did you mean 'batch_size'"),
    # wrong types
    C('P-type-str-for-int', 'pretrain', dict(steps='ten'), 'steps', r'must be int'),
    C('P-type-float-for-int', 'pretrain', dict(steps=2.5), 'steps', r'must be int'),
    C('P-type-float-for-bool', 'pretrain', dict(use_bixt=0.5), 'use_bixt', r'must be bool'),
    C('P-type-int-for-bool', 'pretrain', dict(pack=1), 'pack', r'must be bool'),
    C('P-type-int-for-str', 'pretrain', dict(model_type=5), 'model_type', r'must be str'),
    C('P-type-int-for-str-name', 'pretrain', dict(run_name=20260101), 'run_name', r'must be str'),
    C('P-type-str-for-float', 'pretrain', dict(lr='fast'), 'lr', r'must be float'),
    C('P-type-bool-for-int', 'pretrain', dict(hidden_size=True), 'hidden_size', r'must be int'),
    # out of range
    C('P-range-negative-lr', 'pretrain', dict(lr=-0.001), 'lr', r'> 0'),
    C('P-range-zero-lr', 'pretrain', dict(lr=0.0), 'lr', r'> 0'),
    C('P-range-zero-steps', 'pretrain', dict(steps=0), 'steps', r'>= 1'),
    C('P-range-batch-0', 'pretrain', dict(batch_size=0), 'batch_size', r'>= 1'),
    C('P-range-C-equals-N', 'pretrain', dict(concept_num=64, block_size=64), 'concept_num', r'block_size'),
    C('P-range-C-above-N', 'pretrain', dict(concept_num=16, block_size=8), 'concept_num', r'block_size'),
    C('P-range-t_min-0', 'pretrain', dict(t_min=0.0), 't_min', r'\(0, 1\]'),
    C('P-range-t_min-above-1', 'pretrain', dict(t_min=1.5), 't_min', r'\(0, 1\]'),
    C('P-range-deletion-1', 'pretrain', dict(deletion_rate=1.0), 'deletion_rate', r'\[0, 1\)'),
    C('P-range-deletion-negative', 'pretrain', dict(deletion_rate=-0.1), 'deletion_rate', r'\[0, 1\)'),
    C('P-range-mlm-probability-0', 'pretrain', dict(mlm_probability=0.0), 'mlm_probability', r'\(0, 1\]'),
    C('P-range-negative-loss-weight', 'pretrain', dict(loss_weight=-1.0), 'loss_weight', r'>= 0'),
    C('P-range-negative-weight-decay', 'pretrain', dict(weight_decay=-0.1), 'weight_decay', r'>= 0'),
    C('P-range-grad-accum-0', 'pretrain', dict(grad_accum=0), 'grad_accum', r'>= 1'),
    C('P-range-heads-not-dividing-H', 'pretrain', dict(hidden_size=30, num_attention_heads=4), 'hidden_size',
      r'divisible'),
    C('P-range-negative-heads', 'pretrain', dict(num_attention_heads=-1), 'num_attention_heads', r'>= 0'),
    C('P-range-block-1', 'pretrain', dict(block_size=1), 'block_size', r'>= 2'),
    C('P-range-negative-warmup', 'pretrain', dict(warmup_steps=-1), 'warmup_steps', r'>= 0'),
    C('P-range-negative-seed', 'pretrain', dict(seed=-1), 'seed', r'>= 0'),
    C('P-range-eval-batches-0', 'pretrain', dict(eval_batches=0), 'eval_batches', r'>= 1'),
    C('P-range-negative-max-docs', 'pretrain', dict(max_docs=-5), 'max_docs', r'>= 0'),
    C('P-range-negative-epochs', 'pretrain', dict(epochs=-1.0), 'epochs', r'>= 0'),
    C('P-range-negative-keep', 'pretrain', dict(keep_checkpoints=-1), 'keep_checkpoints', r'>= 0'),
    C('P-range-log-every-0', 'pretrain', dict(log_every=0), 'log_every', r'>= 1'),
    # unknown choices
    C('P-choice-preset', 'pretrain', dict(preset='no-such-preset'), 'preset', r'unknown preset'),
    C('P-choice-model-type', 'pretrain', dict(model_type='perciever_mlm'), 'model_type',
      r"did you mean 'perceiver_mlm'"),
    C('P-choice-objective', 'pretrain', dict(objective='diffusionn'), 'objective', r"did you mean 'diffusion'"),
    C('P-choice-model-objective-mismatch', 'pretrain', dict(model_type='diffusion_mlm'), 'model_type',
      r'cannot learn objective'),
    C('P-choice-loss', 'pretrain', dict(concept_losses='orthogonalty'), 'concept_losses', r'unknown concept loss'),
    C('P-choice-weighting', 'pretrain', dict(loss_weighting='kendal_gal'), 'loss_weighting',
      r"did you mean 'kendall_gal'"),
    C('P-choice-schedule', 'pretrain', dict(schedule='cosin'), 'schedule', r"did you mean 'cosine'"),
    C('P-choice-masking', 'pretrain', dict(masking='words'), 'masking', r'is not one of'),
    C('P-choice-device', 'pretrain', dict(device='gpu'), 'device', r'is not one of'),
    C('P-choice-precision', 'pretrain', dict(mixed_precision='fp8'), 'mixed_precision', r'is not one of'),
    C('P-choice-elbo', 'pretrain', dict(elbo_weighting='mdml'), 'elbo_weighting', r"did you mean 'mdlm'"),
    C('P-choice-concept-positions', 'pretrain', dict(concept_position_type='rotary'), 'concept_position_type',
      r'is not one of'),
    C('P-choice-wandb', 'pretrain', dict(wandb_mode='onlin'), 'wandb_mode', r"did you mean 'online'"),
    C('P-choice-resume-path', 'pretrain', dict(resume_from='/no/such/checkpoint'), 'resume_from', r'does not exist'),
    C('P-choice-init-path', 'pretrain', dict(init_from='/no/such/run'), 'init_from', r'does not exist'),
    # GLUE run notebook
    C('G-unknown-task', 'glue', dict(task='mrpc'), 'task', r"did you mean 'tasks'"),
    C('G-unknown-lrr', 'glue', dict(lrr=1e-5), 'lrr', r"did you mean 'lr'"),
    C('G-choice-task', 'glue', dict(tasks='mrcp'), 'tasks', r"(?i)did you mean 'mrpc'"),
    C('G-choice-no-tasks', 'glue', dict(tasks=''), 'tasks', r'empty'),
    C('G-choice-head', 'glue', dict(head='cls'), 'head', r'is not one of'),
    C('G-choice-pair-encoding', 'glue', dict(pair_encoding='split'), 'pair_encoding', r'is not one of'),
    C('G-cross-pair-head-joint', 'glue', dict(head='pair'), 'head', r"pair_encoding='separate'"),
    C('G-cross-pair-head-single-task', 'glue', dict(head='pair', pair_encoding='separate', tasks='sst2'), 'head',
      r'sentence-pair'),
    C('G-cross-separate-without-pair', 'glue', dict(pair_encoding='separate'), 'pair_encoding', r"head='pair'"),
    C('G-type-seeds', 'glue', dict(seeds='a,b'), 'seeds', r'integers'),
    C('G-range-negative-seed', 'glue', dict(seeds='-1'), 'seeds', r'>= 0'),
    C('G-range-zero-lr', 'glue', dict(lr=0.0), 'lr', r'> 0'),
    C('G-range-batch-0', 'glue', dict(batch_size=0), 'batch_size', r'>= 1'),
    C('G-range-max-length', 'glue', dict(max_length=4), 'max_length', r'>= 8'),
    C('G-range-select-fraction', 'glue', dict(select_fraction=1.0), 'select_fraction', r'\(0, 1\)'),
    C('G-range-negative-epochs', 'glue', dict(epochs=-1), 'epochs', r'>= 0'),
    C('G-range-negative-warmup', 'glue', dict(warmup_steps=-5), 'warmup_steps', r'>= 0'),
    C('G-range-negative-subset', 'glue', dict(train_subset=-1), 'train_subset', r'>= 0'),
    C('G-type-float-for-int', 'glue', dict(epochs=1.5), 'epochs', r'must be int'),
    C('G-type-str-for-bool', 'glue', dict(zero_shot='yes'), 'zero_shot', r'must be bool'),
    C('G-choice-device', 'glue', dict(device='gpu'), 'device', r"'gpu' is not"),
    C('G-choice-wandb', 'glue', dict(wandb_mode='on'), 'wandb_mode', r'is not one of'),
]
N_BAD = len(BAD_PARAMS)
# what a pretraining call gets besides the bad value: were a bad value let through, the run would be seconds long
FAST = dict(device='cpu', wandb_mode='disabled', steps=2, max_docs=20, eval_max_docs=5, eval_every=0, save_every=0)


def _code_cells(path):
    return [c for c in nbformat.read(str(path), as_version=4).cells if c.cell_type == 'code']


def notebook_prologue(kind:str, params:dict, run_dir:str|None=None) -> dict:
    """Execute what papermill executes before a run notebook does any work: the `parameters` cell, papermill's injected
    cell with `params`, the validation cell, and (pretraining) the `resolve_params` line that precedes `start_run`."""
    from papermill.translators import translate_parameters
    cells = _code_cells(TEMPLATES[kind])
    i = next(k for k, c in enumerate(cells) if 'parameters' in c.metadata.get('tags', []))
    assert 'validate_params(globals()' in cells[i + 1].source, 'the cell after the parameters must validate them'
    ns = {}
    exec(compile(cells[i].source, 'parameters', 'exec'), ns)
    if run_dir is not None: params = {**params, 'run_dir': run_dir}
    exec(compile(translate_parameters('python3', 'python', params, 'Parameters'), 'injected-parameters', 'exec'), ns)
    exec(compile(cells[i + 1].source, 'validation', 'exec'), ns)
    if kind == 'pretrain':
        cell = next(c.source for c in cells if 'PT.resolve_params(' in c.source)
        before = cell.split('start_run(')[0].rsplit('\n', 1)[0] if 'start_run(' in cell else cell
        assert 'resolve_params(' in before, 'resolve_params must run before start_run creates the run folder'
        exec(compile(before, 'resolve', 'exec'), ns)
    return ns


def cli_args(params:dict) -> list[str]:
    "`-p NAME VALUE` for typed values (as papermill types them), `-r NAME VALUE` for strings."
    out = []
    for k, v in params.items():
        if isinstance(v, str): out += ['-r', k, v]
        else:
            s = repr(v) if isinstance(v, float) else str(v)
            assert parse_value(s) == v and type(parse_value(s)) is type(v), (k, v)
            out += ['-p', k, s]
    return out


def _check_message(msg:str, case:Case):
    assert '\n' not in msg.strip(), f'not one line: {msg!r}'
    assert re.search(rf'(?<!\w){re.escape(case.culprit)}(?!\w)', msg), f'{case.culprit!r} not named in {msg!r}'
    assert re.search(case.expect, msg), f'{case.expect!r} not in {msg!r}'


@pytest.mark.parametrize('case', BAD_PARAMS, ids=[c.id for c in BAD_PARAMS])
def test_bad_parameter_stops_before_any_work(case, tmp_path, capsys):
    # 1) the run notebook, as papermill executes it (a fresh temporary run_dir would only be made after the checks)
    with pytest.raises(ParamError) as e: notebook_prologue(case.kind, case.params)
    _check_message(str(e.value), case)
    # 2) the package entry point of pretraining (`python -m concept_nb.train` and multi-process launches)
    if case.kind == 'pretrain':
        with pytest.raises(ParamError) as e:
            T.run_pretraining({**FAST, **case.params}, log=QUIET, runs_dir=tmp_path / 'api')
        _check_message(str(e.value), case)
        assert not (tmp_path / 'api').exists()
    # 3) the CLI: exit code 2, one line on stderr naming the parameter, no run folder or record
    runs = tmp_path / 'runs'
    extra = ['--checkpoint', ''] if case.kind == 'glue' else []
    capsys.readouterr()
    assert CLI.main([case.kind, *extra, *cli_args(case.params), '--runs-dir', str(runs)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f'concept-nb {case.kind}: bad parameter:'), err
    _check_message(err[0], case)
    assert not runs.exists(), 'nothing may be created before the parameters are valid'


GOOD_PARAMS = [('pretrain', dict(lr=1)), ('pretrain', dict(num_attention_heads=0)),
               ('pretrain', dict(preset='cpu-small')),
               ('pretrain', dict(concept_losses='none')), ('pretrain', dict(resume_from='latest')),
               ('pretrain', dict(model_type='diffusion_mlm', objective='prefix_diffusion', t_min=1.0)),
               ('glue', dict(seeds='42,43')), ('glue', dict(tasks='MRPC, sts-b')), ('glue', dict(epochs=0)),
               ('glue', dict(head='pair', pair_encoding='separate', tasks='mrpc,stsb'))]


@pytest.mark.parametrize('kind,params', GOOD_PARAMS)
def test_valid_edge_values_are_accepted(kind, params, tmp_path):
    "The checks are not over-strict: valid edge values pass the notebook and the CLI checks."
    notebook_prologue(kind, params, run_dir=str(tmp_path / 'run'))
    R.launch_params(kind, params)
    assert not (tmp_path / 'run').exists()


def test_cli_unknown_preset_option(tmp_path, capsys):
    assert CLI.main(['pretrain', '--preset', 'cpu-smal', '--runs-dir', str(tmp_path / 'runs')]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "unknown preset 'cpu-smal'" in err[0] and "did you mean 'cpu-small'" in err[0]
    assert not (tmp_path / 'runs').exists()


@pytest.fixture(scope='module')
def cli_subprocesses(tmp_path_factory):
    "The real command lines, run concurrently: two CLI calls and papermill on the real pretraining notebook."
    d = tmp_path_factory.mktemp('cli')
    cmds = dict(
        pretrain=[PY, '-m', 'concept_nb.runs', 'pretrain', '-p', 'lrr', '0.1', '--runs-dir', str(d / 'runs1')],
        glue=[PY, '-m', 'concept_nb.runs', 'glue', '--checkpoint', '', '-p', 'tasks', 'mrcp', '--runs-dir',
              str(d / 'runs2')],
        papermill=[str(Path(PY).parent / 'papermill'), str(TEMPLATES['pretrain']), str(d / 'record.ipynb'), '-p', 'lrr',
                   '0.1',
                   '-p', 'run_dir', str(d / 'run'), '-k', 'python3', '--cwd', str(NBS), '--no-progress-bar'])
    procs = {k: subprocess.Popen(c, cwd=ROOT, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for k, c in cmds.items()}
    out = {}
    for k, p in procs.items():
        so, se = p.communicate(timeout=300)
        out[k] = dict(rc=p.returncode, stdout=so, stderr=se)
    return dict(dir=d, **out)


@pytest.mark.parametrize('kind,culprit,hint', [('pretrain', 'lrr', "did you mean 'lr'"), ('glue', 'tasks', "mrpc")])
def test_cli_subprocess_exits_2_with_one_line(cli_subprocesses, kind, culprit, hint):
    r = cli_subprocesses[kind]
    assert r['rc'] == 2, r['stderr'][-3000:]
    err = [l for l in r['stderr'].strip().splitlines() if l.strip()]
    assert len(err) == 1 and f"'{culprit}'" in err[0] and hint in err[0], err
    assert not (cli_subprocesses['dir'] / ('runs1' if kind == 'pretrain' else 'runs2')).exists()


def test_papermill_unknown_parameter_on_the_real_notebook(cli_subprocesses):
    "papermill only warns about an unknown -p name; the notebook's validation cell stops the run with one clear line."
    r, d = cli_subprocesses['papermill'], cli_subprocesses['dir']
    assert r['rc'] != 0
    assert not (d / 'run').exists(), 'no run folder: the run stopped before any work'
    nb = nbformat.read(str(d / 'record.ipynb'), as_version=4)
    errors = [(c, o) for c in nb.cells if c.cell_type == 'code' for o in c.get('outputs', [])
              if o.output_type == 'error']
    assert len(errors) == 1
    cell, err = errors[0]
    assert 'validate_params(globals()' in cell.source
    assert err.ename == 'ParamError' and '\n' not in err.evalue
    assert "unknown parameter 'lrr' (did you mean 'lr'?)" in err.evalue
    assert "ParamError: unknown parameter 'lrr'" in r['stderr']
    later = [c for c in nb.cells[nb.cells.index(cell) + 1:] if c.cell_type == 'code']
    assert later and all(c.execution_count is None for c in later), 'nothing after the validation cell ran'


def test_train_cli_bad_parameter_exits_2(tmp_path, capsys):
    assert CLI.main(['pretrain', '--direct', '-p', 'lrr', '0.1', '-p', 'run_dir', str(tmp_path / 'run')]) == 2
    assert len(capsys.readouterr().err.strip().splitlines()) == 1


@pytest.mark.parametrize('params', [dict(data='./no/such/corpus.txt'), dict(tokenizer='./no/such/tokenizer')])
def test_missing_pretraining_paths_rejected_before_work(params, tmp_path):
    with pytest.raises(ParamError): R.launch_params('pretrain', params)
    with pytest.raises(ParamError): notebook_prologue('pretrain', params, run_dir=str(tmp_path / 'run'))


def test_missing_glue_checkpoint_rejected_before_work(tmp_path, capsys):
    assert CLI.main(['glue', '--checkpoint', '/no/such/run', '--runs-dir', str(tmp_path / 'runs')]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "'checkpoint'" in err[0] and 'does not exist' in err[0]
    assert not (tmp_path / 'runs').exists()


# ======================================================================================================================
# Crash safety: atomic writes, SIGKILL mid-training and mid-save, resume from the newest complete checkpoint
# ======================================================================================================================
def test_atomic_write_failure_keeps_the_previous_file(tmp_path, monkeypatch):
    p = tmp_path / 'metrics.json'
    atomic_write_json(p, dict(status='completed', eval_loss=1.5))
    before = p.read_bytes()
    with pytest.raises(UnicodeEncodeError): atomic_write_text(p, 'x' * 200_000 + '\ud800')   # fails in mid-write
    assert p.read_bytes() == before and os.listdir(tmp_path) == ['metrics.json'], os.listdir(tmp_path)

    def killed(fd): raise KeyboardInterrupt                                           # interrupted before the rename
    monkeypatch.setattr(os, 'fsync', killed)
    with pytest.raises(KeyboardInterrupt): atomic_write_json(p, dict(status='running'))
    assert p.read_bytes() == before and os.listdir(tmp_path) == ['metrics.json']
    monkeypatch.undo()
    atomic_write_json(p, dict(status='running'))
    assert json.loads(p.read_text()) == dict(status='running') and os.listdir(tmp_path) == ['metrics.json']


def _tiny(name='perceiver_mlm', seed=0, **kw):
    torch.manual_seed(seed)
    cfg = {**dict(vocab_size=50, hidden_size=16, concept_num=2, num_hidden_layers=1, num_attention_heads=2,
                  intermediate_size=32, max_sequence_length=16, pad_token_id=0, mask_token_id=1), **kw}
    return build_model(name, **cfg)


def test_interrupted_model_and_checkpoint_saves_keep_the_previous_ones(tmp_path, monkeypatch):
    good = CK.save_model(_tiny(seed=0), None, tmp_path / 'model')
    before = read_state_dict(good)
    new = _tiny(seed=1)

    def half_save(self, d, **kw):
        Path(d).mkdir(parents=True, exist_ok=True); (Path(d) / 'model.safetensors').write_bytes(b'half')
        raise OSError('disk full')
    monkeypatch.setattr(ConceptEncoderForMaskedLM, 'save_pretrained', half_save)
    with pytest.raises(OSError, match='disk full'): CK.save_model(new, None, tmp_path / 'model')
    monkeypatch.undo()
    after = load_model(tmp_path / 'model').state_dict()
    assert all(torch.equal(after[k], v) for k, v in before.items())
    # a checkpoint save that dies after the weights, before the optimizer state and the COMPLETE marker
    model = _tiny()
    opt = torch.optim.AdamW(model.parameters())
    ck = tmp_path / 'run' / 'checkpoints'
    CK.save_checkpoint(ck / 'step-2', model, opt, state=dict(step=2))
    real_save = torch.save

    def dying_save(obj, f, *a, **k):
        if str(f).endswith('optimizer.pt'): raise OSError('killed')
        return real_save(obj, f, *a, **k)
    monkeypatch.setattr(torch, 'save', dying_save)
    for step in (4, 2):                          # a newer step, and a re-save over the existing step-2
        with pytest.raises(OSError, match='killed'):
            CK.save_checkpoint(ck / f'step-{step}', model, opt, state=dict(step=step))
        assert [p.name for p in CK.list_checkpoints(tmp_path / 'run')] == ['step-2']
    monkeypatch.undo()
    assert json.loads((CK.latest_checkpoint(tmp_path / 'run') / 'state.json').read_text())['step'] == 2
    load_model(ck / 'step-2')


RUN = dict(hidden_size=32, concept_num=4, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64,
           block_size=32,
           batch_size=4, max_docs=40, eval_max_docs=10, lr=0.003, warmup_steps=2, steps=24, log_every=1, eval_every=12,
           eval_batches=2, save_every=6, keep_checkpoints=0, concept_losses='combined', loss_weighting='kendall_gal',
           wandb_mode='disabled', device='cpu', seed=7, cpu_threads=1)

# A real `python -m concept_nb.train` run. 'slow': from micro-batch 6 on (after the step-6 checkpoint) each training
# batch takes 0.5 s more, so the test can SIGKILL it mid-training. 'die-in-save': SIGKILL itself in the middle of
# writing the step-12 checkpoint (weights written, optimizer state half-written, no COMPLETE marker).
CHILD = textwrap.dedent('''
    import os, sys, time, signal, torch
    import concept_nb.train as T
    import concept_nb.pretrain as PT
    mode = sys.argv[1]
    batch = PT.BatchStream.batch
    def slow_batch(self, g, *a, **k):
        if mode == 'slow' and self.shuffle and g >= 6: time.sleep(0.5)
        return batch(self, g, *a, **k)
    PT.BatchStream.batch = slow_batch
    save = torch.save
    def dying_save(obj, f, *a, **k):
        if mode == 'die-in-save' and str(f).endswith(os.path.join('.tmp-step-12', 'optimizer.pt')):
            with open(f, 'wb') as fh: fh.write(b'half an optimizer'); fh.flush()
            os.kill(os.getpid(), signal.SIGKILL)
        return save(obj, f, *a, **k)
    torch.save = dying_save
    from concept_nb.cli import main
    sys.exit(main(['pretrain', '--direct', *sys.argv[2:]]))
''')


def _train_argv(params:dict) -> list[str]:
    return [x for k, v in params.items() for x in ('-p', k, str(v))]


def _curve(run_dir, kind='train', key='loss') -> dict:
    recs = [json.loads(l) for l in (Path(run_dir) / 'history.jsonl').read_text().splitlines() if l.strip()]
    return {r['step']: r[key] for r in recs if r['kind'] == kind}


@pytest.fixture(scope='module')
def crashed(tmp_path_factory):
    "Two real training processes killed with SIGKILL (mid-training and mid-save), and the uninterrupted reference run."
    d = tmp_path_factory.mktemp('crash')
    logs = {k: open(d / f'{k}.log', 'w') for k in ('killed', 'died')}
    a = subprocess.Popen([PY, '-c', CHILD, 'slow', *_train_argv({**RUN, 'run_dir': d / 'killed'})], cwd=d, env=ENV,
                         stdout=logs['killed'], stderr=subprocess.STDOUT)
    b = subprocess.Popen([PY, '-c', CHILD, 'die-in-save', *_train_argv({**RUN, 'run_dir': d / 'died'})], cwd=d, env=ENV,
                         stdout=logs['died'], stderr=subprocess.STDOUT)
    try:
        first = d / 'killed' / 'checkpoints' / 'step-6' / 'COMPLETE'
        deadline = time.time() + 300
        while not first.exists():
            assert a.poll() is None, ("the run ended before its first "
                                      f"checkpoint:\n{(d / 'killed.log').read_text()[-3000:]}")
            assert time.time() < deadline, 'no checkpoint after 300 s'
            time.sleep(0.02)
        time.sleep(0.3)                                       # somewhere inside step 7
        os.kill(a.pid, signal.SIGKILL)
        a.wait(30); b.wait(300)
    finally:
        for p in (a, b):
            if p.poll() is None: p.kill(); p.wait()
        for f in logs.values(): f.close()
    ref = T.run_pretraining({**RUN, 'run_dir': str(d / 'ref')}, log=QUIET)
    return dict(dir=d, killed=d / 'killed', died=d / 'died', ref=d / 'ref', ref_metrics=ref, rc_killed=a.returncode,
                rc_died=b.returncode)


def _optimizer_for(model):
    lm = LossManager(LossConfig.from_flat(RUN['concept_losses'], RUN['loss_weighting'], 0.1))
    opt = T.make_optimizer(T.param_groups(model, lm, 0.01), RUN['lr'])
    return lm, opt, T.make_scheduler(opt, 'cosine', RUN['warmup_steps'], RUN['steps'])


def test_sigkill_mid_training_leaves_a_loadable_checkpoint(crashed):
    run = crashed['killed']
    assert crashed['rc_killed'] == -signal.SIGKILL, (crashed['dir'] / 'killed.log').read_text()[-2000:]
    assert json.loads((run / 'metrics.json').read_text())['status'] == 'running' and not (run / 'model').exists()
    latest = CK.latest_checkpoint(run)
    assert latest is not None and 6 <= CK.checkpoint_step(latest) < RUN['steps']
    model = load_model(latest)                                       # strict: every weight, right shapes
    lm, opt, sched = _optimizer_for(model)
    state = CK.load_checkpoint(latest, model, opt, sched, lm)         # optimizer, schedule and loss weights too
    assert state['step'] == CK.checkpoint_step(latest) and opt.state_dict()['state']
    assert sched.last_epoch == state['step']
    ref = read_state_dict(crashed['ref'] / 'checkpoints' / latest.name)   # same weights as the uninterrupted run
    mine = read_state_dict(latest)
    assert mine.keys() == ref.keys() and all(torch.equal(mine[k], ref[k]) for k in ref)


def test_resume_latest_after_sigkill_reaches_the_same_final_metrics(crashed, tmp_path):
    run = tmp_path / 'killed'
    shutil.copytree(crashed['killed'], run)
    latest = CK.latest_checkpoint(run)
    n = CK.checkpoint_step(latest)
    # newer checkpoints that never completed must be ignored: no COMPLETE marker, an interrupted save's temp folder
    fake = run / 'checkpoints' / f'step-{n + 100}'
    shutil.copytree(latest, fake); (fake / 'COMPLETE').unlink()
    shutil.copytree(latest, run / 'checkpoints' / f'.tmp-step-{n + 200}')
    assert CK.latest_checkpoint(run) == latest
    with pytest.raises(FileNotFoundError, match='incomplete checkpoint'): CK.resume_point(str(fake))
    m = T.run_pretraining({**RUN, 'run_dir': str(run), 'resume_from': 'latest'}, log=QUIET)
    ref = crashed['ref_metrics']
    assert m['status'] == 'completed' and m['train']['steps'] == ref['train']['steps'] == RUN['steps']
    for k in ('train_loss_end', 'task_loss_end', 'eval_loss', 'effective_rank', 'rankme'):
        assert m['results'][k] == pytest.approx(ref['results'][k], abs=1e-6), k
    assert _curve(run) == pytest.approx(_curve(crashed['ref']), abs=1e-6)          # every step, none twice
    assert _curve(run, 'eval', 'eval_loss') == pytest.approx(_curve(crashed['ref'], 'eval', 'eval_loss'), abs=1e-6)
    assert f'resumed from {latest} at step {n}' in (run / 'log.txt').read_text()


def test_sigkill_during_a_checkpoint_save(crashed):
    run = crashed['died']
    assert crashed['rc_died'] == -signal.SIGKILL, (crashed['dir'] / 'died.log').read_text()[-2000:]
    tmp = run / 'checkpoints' / '.tmp-step-12'
    assert tmp.is_dir() and (tmp / 'model.safetensors').exists() and not (tmp / 'COMPLETE').exists()
    assert [p.name for p in CK.list_checkpoints(run)] == ['step-6']
    load_model(CK.latest_checkpoint(run))
    m = T.run_pretraining({**RUN, 'run_dir': str(run), 'resume_from': 'latest'}, log=QUIET)
    ref = crashed['ref_metrics']
    m, ref = m['results'], ref['results']
    assert (m['train_loss_end'], m['eval_loss']) == pytest.approx((ref['train_loss_end'], ref['eval_loss']), abs=1e-6)
    assert (not tmp.exists()
            and [p.name for p in CK.list_checkpoints(run)] == ['step-6', 'step-12', 'step-18', 'step-24'])


def test_resume_survives_a_half_written_history_line(crashed, tmp_path):
    run = tmp_path / 'killed'
    shutil.copytree(crashed['killed'], run)
    with open(run / 'history.jsonl', 'a') as f: f.write('{"step": 8, "kind": "train", "lo')
    m = T.run_pretraining({**RUN, 'run_dir': str(run), 'resume_from': 'latest'}, log=QUIET)
    assert (m['results']['train_loss_end']
            == pytest.approx(crashed['ref_metrics']['results']['train_loss_end'], abs=1e-6))


# ======================================================================================================================
# Determinism
# ======================================================================================================================
def test_same_seed_same_loss_curve(crashed, tmp_path):
    "A second run with the same seed and parameters repeats the reference run's loss curve exactly (CPU)."
    m = T.run_pretraining({**RUN, 'run_dir': str(tmp_path / 'again')}, log=QUIET)
    assert _curve(tmp_path / 'again') == _curve(crashed['ref'])
    assert _curve(tmp_path / 'again', 'train', 'task_loss') == _curve(crashed['ref'], 'train', 'task_loss')
    assert _curve(tmp_path / 'again', 'eval', 'eval_loss') == _curve(crashed['ref'], 'eval', 'eval_loss')
    assert m['results']['eval_loss'] == crashed['ref_metrics']['results']['eval_loss']
    # and across processes: the killed `python -m concept_nb.train` run logged the same losses up to its checkpoint
    n = CK.checkpoint_step(CK.latest_checkpoint(crashed['killed']))
    child = {s: v for s, v in _curve(crashed['killed']).items() if s <= n}
    assert child == {s: v for s, v in _curve(crashed['ref']).items() if s <= n} and len(child) == n


def test_different_seed_different_curve(crashed, tmp_path):
    "The determinism test can fail: another seed gives another curve."
    m = T.run_pretraining({**RUN, 'run_dir': str(tmp_path / 'seed8'), 'seed': 8, 'steps': 2, 'eval_every': 0},
                          log=QUIET)
    assert m['results']['train_loss_start'] != crashed['ref_metrics']['results']['train_loss_start']


# ======================================================================================================================
# Corrupt inputs: checkpoints
# ======================================================================================================================
@pytest.fixture(scope='module')
def good_model(tmp_path_factory):
    return CK.save_model(_tiny(), None, tmp_path_factory.mktemp('ck') / 'good')


def _variant(good, tmp_path, name, edit):
    d = tmp_path / name
    shutil.copytree(good, d)
    edit(d)
    return d


def _edit_tensors(fn):
    def edit(d):
        sd = read_state_dict(d); fn(sd); save_file(sd, str(d / 'model.safetensors'))
    return edit


def _truncate(f, keep=0.5):
    b = Path(f).read_bytes(); Path(f).write_bytes(b[:int(len(b) * keep)])


LOADERS = {'load_model': load_model, 'read_state_dict': read_state_dict,
           'classifier_from_pretrained': lambda p: classifier_from_pretrained(p),
           'train.load_model_weights': lambda p: CK.load_model_weights(_tiny(), p)}


@pytest.mark.parametrize('loader', list(LOADERS))
@pytest.mark.parametrize('name,edit', [('truncated', lambda d: _truncate(d / 'model.safetensors')),
                                       ('empty', lambda d: (d / 'model.safetensors').write_bytes(b'')),
                                       ('garbage', lambda d: (d / 'model.safetensors').write_bytes(os.urandom(4096)))])
def test_unreadable_safetensors_is_named(good_model, tmp_path, loader, name, edit):
    d = _variant(good_model, tmp_path, name, edit)
    with pytest.raises(ValueError, match=re.escape(str(d / 'model.safetensors'))): LOADERS[loader](d)


def test_wrong_shapes_missing_and_unexpected_keys_are_named(good_model, tmp_path):
    def widen(sd): sd['encoder.concepts'] = torch.zeros(3, 16)
    d = _variant(good_model, tmp_path, 'shape', _edit_tensors(widen))
    with pytest.raises(ValueError, match=r'shape mismatch.*encoder\.concepts.*\(3, 16\).*\(2, 16\)') as e: load_model(d)
    assert str(d) in str(e.value)
    with pytest.raises(ValueError, match=r'shape mismatch.*encoder\.concepts') as e: classifier_from_pretrained(d)
    assert str(d) in str(e.value)

    d = _variant(good_model, tmp_path, 'missing', _edit_tensors(lambda sd: sd.pop('encoder.concepts')))
    for f in (load_model, lambda p: CK.load_model_weights(_tiny(), p), lambda p: classifier_from_pretrained(p)):
        with pytest.raises((KeyError, ValueError), match=r'encoder\.concepts') as e: f(d)
        assert str(d) in str(e.value)

    d = _variant(good_model, tmp_path, 'unexpected',
                 _edit_tensors(lambda sd: sd.update({'encoder.rogue': torch.zeros(2)})))
    for f in (load_model, lambda p: CK.load_model_weights(_tiny(), p)):
        with pytest.raises((KeyError, ValueError), match=r'unexpected.*encoder\.rogue') as e: f(d)
        assert str(d) in str(e.value)


def test_other_model_types_are_refused(good_model, tmp_path):
    def as_bert(d):
        c = json.loads((d / 'config.json').read_text()); c['model_type'] = 'bert'
        (d / 'config.json').write_text(json.dumps(c))
    d = _variant(good_model, tmp_path, 'bert', as_bert)
    for f in (load_model, lambda p: classifier_from_pretrained(p)):
        with pytest.raises(ValueError, match=re.escape(str(d / 'config.json')) + r".*'bert'"): f(d)

    def unknown_arch(d):
        c = json.loads((d / 'config.json').read_text()); c['architectures'] = ['BertForMaskedLM']
        (d / 'config.json').write_text(json.dumps(c))
    d = _variant(good_model, tmp_path, 'arch', unknown_arch)
    with pytest.raises(ValueError, match=r"unknown architecture 'BertForMaskedLM'"): load_model(d)
    # resuming a checkpoint of one model type into another (e.g. model_type changed between the runs)
    for other in ('weighted_mlm', 'diffusion_mlm'):
        with pytest.raises(ValueError, match=re.escape(str(good_model)) + r'.*does not match'):
            CK.load_model_weights(_tiny(other), good_model)


def test_garbage_or_missing_config_is_named(good_model, tmp_path):
    for name, text in (('not_json', '{"model_type": "concept_enc'), ('empty', ''), ('control_chars', '\x00\x01\x02')):
        d = _variant(good_model, tmp_path, name, lambda d, text=text: (d / 'config.json').write_text(text))
        for f in (load_model, lambda p: classifier_from_pretrained(p)):
            with pytest.raises(ValueError, match=re.escape(str(d / 'config.json'))): f(d)
    d = _variant(good_model, tmp_path, 'no_config', lambda d: (d / 'config.json').unlink())
    with pytest.raises(FileNotFoundError, match=re.escape(str(d)) + r' has no config\.json'): load_model(d)


@pytest.mark.parametrize('content', [
    pytest.param(b'[1, 2]', id='json-list'), pytest.param(b'\x80\xff\xfe binary', id='binary')])
def test_config_json_that_is_not_a_json_object(good_model, tmp_path, content):
    d = _variant(good_model, tmp_path, 'cfg', lambda d: (d / 'config.json').write_bytes(content))
    with pytest.raises(ValueError, match=re.escape(str(d / 'config.json'))): load_model(d)


def test_config_json_with_an_invalid_field_is_named(good_model, tmp_path):
    def bad_field(d):
        c = json.loads((d / 'config.json').read_text()); c['hidden_size'] = -3
        (d / 'config.json').write_text(json.dumps(c))
    d = _variant(good_model, tmp_path, 'bad_field', bad_field)
    with pytest.raises(ValueError, match=re.escape(str(d / 'config.json')) + '.*hidden_size'): load_model(d)


@pytest.mark.parametrize('damage', ['truncated', 'garbage'])
def test_unreadable_pytorch_bin_is_named(good_model, tmp_path, damage):
    def to_bin(d):
        sd = read_state_dict(d); (d / 'model.safetensors').unlink(); torch.save(sd, d / 'pytorch_model.bin')
        if damage == 'truncated': _truncate(d / 'pytorch_model.bin')
        else: (d / 'pytorch_model.bin').write_bytes(b'garbage\x00\xff' * 50)
    d = _variant(good_model, tmp_path, damage, to_bin)
    with pytest.raises(ValueError, match=re.escape(str(d / 'pytorch_model.bin'))): read_state_dict(d)


def test_resume_from_a_checkpoint_of_another_size_is_named(good_model):
    wider = _tiny(hidden_size=32)
    with pytest.raises(ValueError, match=re.escape(str(good_model)) + '.*shape'):
        CK.load_model_weights(wider, good_model)


def test_truncated_optimizer_state_is_named(tmp_path):
    model = _tiny()
    opt = torch.optim.AdamW(model.parameters())
    model(torch.tensor([[2, 3, 4]]), labels=torch.tensor([[2, 3, 4]])).loss.backward(); opt.step()
    ck = CK.save_checkpoint(tmp_path / 'checkpoints' / 'step-1', model, opt, state=dict(step=1))
    _truncate(ck / 'optimizer.pt')
    with pytest.raises(ValueError, match=re.escape(str(ck / 'optimizer.pt'))):
        CK.load_checkpoint(ck, _tiny(), torch.optim.AdamW(model.parameters()))


def test_init_from_source_problems_are_named(good_model, tmp_path):
    "init_from (warm start) loads the encoder strictly: a bad source is an error naming the file, never a partial load."
    init = CK.init_encoder_from
    with pytest.raises(FileNotFoundError, match='/no/such/run'): init(_tiny(), '/no/such/run')
    d = _variant(good_model, tmp_path, 'truncated', lambda d: _truncate(d / 'model.safetensors'))
    with pytest.raises(ValueError, match=re.escape(str(d / 'model.safetensors'))): init(_tiny(), d)
    with pytest.raises(ValueError, match=re.escape(str(good_model / 'model.safetensors')) + '.*shape'):
        init(_tiny(hidden_size=32), good_model)
    def drop(sd): sd.pop('encoder.concepts')
    d = _variant(good_model, tmp_path, 'missing', _edit_tensors(drop))
    with pytest.raises(ValueError, match=re.escape(str(d / 'model.safetensors')) + r'.*encoder\.concepts'):
        init(_tiny(), d)
    def rename(sd):
        for k in list(sd): sd['x.' + k] = sd.pop(k)
    d = _variant(good_model, tmp_path, 'no_encoder', _edit_tensors(rename))
    with pytest.raises(ValueError, match=r'no encoder\.\* tensors'): init(_tiny(), d)
    run = tmp_path / 'run'                                  # a run folder whose only checkpoint never completed
    CK.save_model(_tiny(), None, run / 'checkpoints' / 'step-2')
    with pytest.raises(FileNotFoundError, match='holds no saved model'): init(_tiny(), run)
    report = init(_tiny(seed=5), good_model)                # and a good source loads every encoder tensor
    assert report['loaded'] == sum(k.startswith('encoder.') for k in read_state_dict(good_model))


def test_latest_skips_a_checkpoint_without_its_state(tmp_path):
    model = _tiny()
    ck = tmp_path / 'checkpoints'
    CK.save_checkpoint(ck / 'step-2', model, torch.optim.AdamW(model.parameters()), state=dict(step=2))
    shutil.copytree(ck / 'step-2', ck / 'step-4'); (ck / 'step-4' / 'state.json').unlink()
    shutil.copytree(ck / 'step-2', ck / 'step-6'); (ck / 'step-6' / 'model.safetensors').unlink()
    assert CK.latest_checkpoint(tmp_path) == ck / 'step-2'


def test_glue_uses_only_complete_checkpoints(tmp_path):
    m = _tiny()
    CK.save_checkpoint(tmp_path / 'run' / 'checkpoints' / 'step-2', m, state=dict(step=2))
    CK.save_model(m, None, tmp_path / 'run' / 'checkpoints' / 'step-4')          # an unfinished save: no COMPLETE
    with pytest.warns(UserWarning, match='newest checkpoint'):
        ck = CK.resolve_checkpoint(str(tmp_path / 'run'))
    assert ck.path.name == 'step-2'


# ======================================================================================================================
# Corrupt inputs: run records in the registry
# ======================================================================================================================
TPL_PARAMS = textwrap.dedent('''
    run_dir: str = ""  # output folder
    run_name: str = ""  # run name
    model_type: str = "perceiver_mlm"  # model
    hidden_size: int = 16  # H
    num_hidden_layers: int = 2  # L
    concept_num: int = 4  # C
    sleep_s: float = 0.0  # seconds to sleep in the body (a long run)
''').strip()
TPL_BODY = textwrap.dedent('''
    import json, tempfile, time
    from pathlib import Path
    from IPython.display import display
    run_dir = Path(run_dir or tempfile.mkdtemp())
    (run_dir/"metrics.json").write_text(json.dumps(dict(status="running", steps=0)))
    time.sleep(sleep_s)
    metrics = dict(status="completed", steps=3, eval_loss=6.5)
''').strip()
TPL_METRICS = ('display({"application/json": metrics}, '
               'raw=True)\n(run_dir/"metrics.json").write_text(json.dumps(metrics))')


@pytest.fixture(scope='module')
def template(tmp_path_factory):
    nb = nbformat.v4.new_notebook(metadata={'kernelspec': {'name': 'python3', 'display_name': 'python3',
                                                           'language': 'python'}})
    nb.cells = [nbformat.v4.new_code_cell(TPL_PARAMS, metadata={'tags': ['parameters']}),
                nbformat.v4.new_code_cell(TPL_BODY),
                nbformat.v4.new_code_cell(TPL_METRICS, metadata={'tags': ['metrics']})]
    p = tmp_path_factory.mktemp('tpl') / 'tiny.ipynb'
    nbformat.write(nb, str(p))
    return p


def test_half_written_records_are_incomplete_not_a_crash(template, tmp_path):
    src = tmp_path / 'src'
    rec = R.run_notebook('pretrain', {'run_name': 'ok'}, src, template=template, rules={}, log_output=False)
    folder = src / rec.stem
    runs = tmp_path / 'runs'
    runs.mkdir()

    def copy(name, with_record=True, with_folder=True):
        if with_record: shutil.copy(rec, runs / f'2026-03-01_{name}.ipynb')
        if with_folder: shutil.copytree(folder, runs / f'2026-03-01_{name}')
        return runs / f'2026-03-01_{name}.ipynb', runs / f'2026-03-01_{name}'
    r, f = copy('truncated_record'); _truncate(r, 0.6)
    r, f = copy('empty_record'); r.write_bytes(b'')
    r, f = copy('binary_record'); r.write_bytes(b'\x80\xff\xfe\x00' * 64); (f / 'metrics.json').unlink()
    r, f = copy('no_metrics')                               # killed before the metrics cell: no output, no metrics.json
    nb = nbformat.read(str(r), as_version=4)
    nb.cells[-1].outputs = []; nb.cells[-1].execution_count = None
    nbformat.write(nb, str(r)); (f / 'metrics.json').unlink()
    r, f = copy('folder_only_truncated_metrics', with_record=False); _truncate(f / 'metrics.json', 0.5)
    r, f = copy('folder_only_no_metrics', with_record=False); (f / 'metrics.json').unlink()
    r, f = copy('metrics_not_an_object'); _truncate(r, 0.3); (f / 'metrics.json').write_text('[1, 2]')
    r, f = copy('garbage_sidecars')                              # the record itself is fine
    for name in ('run.json', 'params.json'): (f / name).write_bytes(b'\xff{not json')
    reg = RG.load_registry(runs).set_index('run_id')
    status = reg.status.to_dict()
    assert status.pop('2026-03-01_garbage_sidecars') == 'completed'
    assert len(status) == 7 and set(status.values()) == {'incomplete'}, status
    assert RP.write_experiment_log(runs).exists()


def test_killed_papermill_run_is_incomplete(template, tmp_path):
    runs = tmp_path / 'runs'
    script = ("import sys\nfrom concept_nb import runs as R\n"
              "R.run_notebook('pretrain', {'sleep_s': 300.0, 'run_name': 'killed'}, sys.argv[1], template=sys.argv[2], "
              "rules={}, log_output=False)\n")
    p = subprocess.Popen([PY, '-c', script, str(runs), str(template)], cwd=tmp_path, env=ENV,
                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 180
        while True:                                              # wait until the body cell is sleeping
            m = next(runs.glob('*_killed/metrics.json'), None) if runs.exists() else None
            try:
                if m is not None and 'steps' in json.loads(m.read_text()): break
            except ValueError: pass
            assert p.poll() is None and time.time() < deadline, 'the run did not start'
            time.sleep(0.1)
        kids = _descendants(p.pid)                               # the kernel: started by this run
        p.send_signal(signal.SIGKILL); p.wait(30)
        for pid in kids:
            try: os.kill(pid, signal.SIGKILL)
            except ProcessLookupError: pass
    finally:
        if p.poll() is None: p.kill(); p.wait()
    row = RG.load_registry(runs).iloc[0]
    assert row.run_id.endswith('_killed') and row.status == 'incomplete', row.status


def _descendants(pid:int) -> list[int]:
    parent = {}
    for d in Path('/proc').iterdir():
        if d.name.isdigit():
            try: parent[int(d.name)] = int((d / 'stat').read_text().rsplit(')', 1)[1].split()[1])
            except (OSError, IndexError, ValueError): pass
    out, todo = [], [pid]
    while todo:
        q = todo.pop()
        kids = [c for c, pp in parent.items() if pp == q]
        out += kids; todo += kids
    return out


# ======================================================================================================================
# Corrupt inputs: text sources and the data path (hypothesis)
# ======================================================================================================================
_TOKS = {}


def tok(kind='wordpiece'):
    if kind not in _TOKS: _TOKS[kind] = load_tokenizer('embedded' if kind == 'wordpiece' else 'embedded-bpe')
    return _TOKS[kind]


BLANK_LINE = re.compile(r'\n[ \t\r\f\v]*\n')


def check_blocks(ds, t, block_size:int, pack:bool):
    "Every row is a valid model input: 1..block_size ids of the vocabulary, an all-ones mask of the same length."
    V = len(t)
    for ids, am in zip(ds['input_ids'], ds['attention_mask']):
        assert 1 <= len(ids) <= block_size and am == [1] * len(ids)
        assert all(0 <= i < V for i in ids)
        assert ids[0] == t.cls_token_id
        if pack: assert len(ids) == 1 or ids[1] != t.sep_token_id, 'a block starts with [CLS] [SEP]'
        else: assert ids[-1] == t.sep_token_id


def test_text_sources_with_empty_docs_bad_bytes_and_a_1mb_line(tmp_path):
    big = ('lorem ipsum dolor sit amet ' * 40_000)[:1_000_000]
    assert len(big) == 1_000_000
    (tmp_path / 'a.txt').write_bytes(b'\n\n\n  \n\n' + b'caf\xe9 \xff\xfe bytes \xc3\x28 doc\n\n\n\n' + big.encode()
                                     + b'\n\n \t \n')
    (tmp_path / 'b.jsonl').write_bytes(b'\n'.join([b'{"text": ""}', b'', b'{"text": "   "}', b'{"text": "ok \xff doc"}',
                                                   json.dumps({'text': big}).encode(), b'"a bare string doc"', b'  ']))
    with open(tmp_path / 'c.csv', 'w', newline='', encoding='utf-8') as f:
        w = csv.writer(f); w.writerow(['id', 'text'])
        w.writerows([[1, ''], [2, big], [3, 'a "quoted",\nmulti-line doc'], [4, ' ']])
    (tmp_path / 'empty.txt').write_bytes(b'')
    expect = {'a.txt': ['caf\ufffd \ufffd\ufffd bytes \ufffd( doc', big.strip()],
              'b.jsonl': ['ok \ufffd doc', big.strip(), 'a bare string doc'],
              'c.csv': [big.strip(), 'a "quoted",\nmulti-line doc'], 'empty.txt': []}
    for name, docs in expect.items():
        assert list(load_text(tmp_path / name, 'all')['text']) == docs, name
    folder = list(load_text(tmp_path, 'all')['text'])                  # the folder: all four files, in name order
    assert folder == [d for n in sorted(expect) for d in expect[n]]
    t = tok()
    ds = pack_documents(load_text(tmp_path / 'a.txt', 'all'), t, 64)
    check_blocks(ds, t, 64, True)
    assert len(ds) > 3000                                        # the 1 MB line became many full blocks
    assert sum(len(x) == 64 for x in ds['input_ids']) >= len(ds) - 1


def test_jsonl_with_unicode_line_separators_inside_strings(tmp_path):
    docs = ['first\u2028second', 'nel\x85inside', 'para\u2029graph']
    (tmp_path / 'u.jsonl').write_text('\n'.join(json.dumps({'text': d}, ensure_ascii=False) for d in docs) + '\n',
                                      encoding='utf-8')
    assert list(load_text(tmp_path / 'u.jsonl', 'all')['text']) == docs


def test_jsonl_with_a_lone_surrogate_escape(tmp_path):
    (tmp_path / 's.jsonl').write_text('{"text": "cut emoji \\ud83d here"}\n{"text": "fine"}\n')
    out = list(load_text(tmp_path / 's.jsonl', 'all')['text'])
    assert len(out) == 2 and out[0].startswith('cut emoji ') and out[0].endswith(' here') and out[1] == 'fine'


HYP = settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
docs_st = st.lists(st.one_of(st.text(max_size=200), st.binary(max_size=200),
                             st.sampled_from(['', ' ', '\n', '\r\n\r\n', '[SEP]', '[CLS] [PAD]', '\ufeff', '\x00'])),
                   max_size=8)


@HYP
@given(docs=docs_st, suffix=st.sampled_from(['.txt', '.jsonl', '.csv']), block=st.integers(2, 48), pack=st.booleans())
def test_load_text_and_packing_on_arbitrary_documents(docs, suffix, block, pack):
    with tempfile.TemporaryDirectory() as d:
        p = Path(d) / f'docs{suffix}'
        strs = [x.decode('utf-8', 'replace') if isinstance(x, bytes) else x for x in docs]
        if suffix == '.txt': p.write_bytes(b'\n\n'.join(x if isinstance(x, bytes) else x.encode() for x in docs))
        elif suffix == '.jsonl': p.write_text(''.join(json.dumps({'text': s}) + '\n' for s in strs))
        else:
            with open(p, 'w', newline='', encoding='utf-8') as f:
                w = csv.writer(f); w.writerow(['text']); w.writerows([[s] for s in strs])
        out = list(load_text(p, 'all')['text'])
        assert all(isinstance(s, str) and s and s == s.strip() for s in out)
        if suffix == '.txt': assert not any(BLANK_LINE.search(s) for s in out)
        else: assert out == [s.strip() for s in strs if s.strip()]
        parts = list(load_text(p, 'train')['text']) + list(load_text(p, 'validation')['text'])
        assert sorted(parts) == sorted(out)                         # the held-out split partitions the documents
    t = tok()
    ds = pack_documents(out, t, block, pack=pack)
    check_blocks(ds, t, block, pack)


@HYP
@given(docs=st.lists(st.text(max_size=300), max_size=10), block=st.integers(2, 48), pack=st.booleans(),
       kind=st.sampled_from(['wordpiece', 'bpe']))
def test_packing_keeps_every_token(docs, block, pack, kind):
    t = tok(kind)
    ds = pack_documents(docs, t, block, pack=pack)
    check_blocks(ds, t, block, pack)
    real = [d for d in docs if d and d.strip()]
    special = {t.cls_token_id, t.sep_token_id}
    if pack:
        want = sum(sum(i not in special for i in t(d, add_special_tokens=False)['input_ids']) for d in real)
        assert sum(sum(i not in special for i in ids) for ids in ds['input_ids']) == want
    else:
        assert len(ds) == len(real)


# ---------------------------------------------------------------------------------------------------------------------
# every collator on random features: random lengths, pre-padding (right, left, holes), special tokens anywhere
# ---------------------------------------------------------------------------------------------------------------------
def _collators():
    out = []
    for kind in ('wordpiece', 'bpe'):
        t = tok(kind)
        out += [MLMCollator(t, seed=0), MLMCollator(t, mlm_probability=1.0, pad_to_multiple_of=8, seed=1),
                MLMCollator(t, mlm_probability=0.5, masking='whole_word', seed=2),
                MLMCollator(t, mlm_probability=0.5, masking='span', span_length=(1, 4), pad_to_multiple_of=8, seed=3),
                MaskedReconstructionCollator(t, seed=4),
                MaskedReconstructionCollator(t, deletion_rate=0.95, whole_word=True, pad_to_multiple_of=8, seed=5),
                MaskedReconstructionCollator(t, deletion_rate=0.0, seed=6), DiffusionCollator(t, seed=7),
                TSDAECollator(t, seed=12), TSDAECollator(t, deletion_rate=0.95, pad_to_multiple_of=8, seed=13),
                DiffusionCollator(t, t_min=1.0, pad_to_multiple_of=8, seed=8),
                DiffusionCollator(t, t_min=0.01, eps=0.1, seed=9),
                PrefixDiffusionCollator(t, seed=10),
                PrefixDiffusionCollator(t, prefix_frac=(0.1, 0.9), pad_to_multiple_of=8, seed=11)]
    return out


_COLL = []


def collators():
    if not _COLL: _COLL.extend(_collators())
    return _COLL


@st.composite
def features_st(draw, t):
    "A batch of features, each with its reference real-token mask (attention_mask and not [PAD])."
    specials = [t.cls_token_id, t.sep_token_id, t.mask_token_id, t.unk_token_id, t.pad_token_id]
    feats, refs = [], []
    for _ in range(draw(st.integers(1, 4))):
        n = draw(st.integers(0, 20))
        ids = draw(st.lists(st.one_of(st.integers(5, len(t) - 1), st.sampled_from(specials)), min_size=n, max_size=n))
        style = draw(st.sampled_from(['list', 'plain', 'mask', 'right_pad', 'right_pad_no_mask', 'left_pad', 'holes']))
        k = draw(st.integers(0, 6))
        pad = t.pad_token_id
        am = [1] * n
        if style in ('right_pad', 'right_pad_no_mask'): ids, am = ids + [pad] * k, am + [0] * k
        elif style == 'left_pad': ids, am = [pad] * k + ids, [0] * k + am
        elif style == 'holes': am = draw(st.lists(st.integers(0, 1), min_size=n, max_size=n))
        if style == 'list': feats.append(list(ids))
        elif style in ('plain', 'right_pad_no_mask'): feats.append({'input_ids': ids})
        else: feats.append({'input_ids': ids, 'attention_mask': am})
        real = [bool(a) and i != pad for i, a in zip(ids, am)]
        refs.append((ids, real))
    return feats, refs


def _reference(refs, L, pad):
    "Padded original ids and real mask (B, L), trimmed after each row's last real token as the collators do."
    B = len(refs)
    ids, real = torch.full((B, L), pad), torch.zeros(B, L, dtype=torch.bool)
    for b, (x, r) in enumerate(refs):
        e = max([j + 1 for j, v in enumerate(r) if v], default=0)
        assert e <= L
        ids[b, :e], real[b, :e] = torch.tensor(x[:e], dtype=torch.long), torch.tensor(r[:e])
    return ids, real


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(data=st.data())
def test_every_collator_on_random_padded_batches(data):
    coll = data.draw(st.sampled_from(collators()), label='collator')
    t = coll.tokenizer
    feats, refs = data.draw(features_st(t), label='features')
    pad, B = t.pad_token_id, len(feats)
    special = lambda x: torch.isin(x, coll.special_ids)
    if isinstance(coll, PrefixDiffusionCollator):
        n_real = [sum(r) for _, r in refs]
        if min(n_real) < 2:
            with pytest.raises(ValueError, match=r'features\[\d+\] has [01] real token'): coll(feats)
            return
        out = coll(feats)
        am, dam, lab = out['attention_mask'].bool(), out['decoder_attention_mask'].bool(), out['labels']
        assert out['input_ids'].shape == am.shape and out['decoder_input_ids'].shape == dam.shape == lab.shape
        assert out['t'].shape == (B,) and ((out['t'] >= coll.t_min) & (out['t'] <= 1)).all()
        if coll.pad_to_multiple_of: assert am.shape[1] % 8 == 0 and dam.shape[1] % 8 == 0
        assert (out['input_ids'][~am] == pad).all() and (out['decoder_input_ids'][~dam] == pad).all()
        assert (lab[~dam] == IGNORE_INDEX).all()
        noised = lab != IGNORE_INDEX
        assert (out['decoder_input_ids'][noised] == t.mask_token_id).all() and not special(lab[noised]).any()
        for b, (x, r) in enumerate(refs):
            want = torch.tensor([i for i, v in zip(x, r) if v], dtype=torch.long)
            suffix = torch.where(noised[b], lab[b], out['decoder_input_ids'][b])[dam[b]]
            assert am[b].sum() >= 1 and dam[b].sum() >= 1
            assert torch.equal(torch.cat([out['input_ids'][b][am[b]], suffix]), want)   # prefix + suffix = the text
        return
    out = coll(feats)
    if isinstance(coll, TSDAECollator):                 # survivors closed up for the encoder; labels = the original
        lab, dam, am = out['labels'], out['decoder_attention_mask'].bool(), out['attention_mask'].bool()
        L = lab.shape[1]
        assert dam.shape == lab.shape and out['input_ids'].shape == am.shape and len(lab) == B
        if coll.pad_to_multiple_of: assert L % 8 == 0 and am.shape[1] % 8 == 0
        orig, real = _reference(refs, L, pad)
        assert torch.equal(dam, real) and torch.equal(lab, torch.where(real, orig, torch.full_like(orig, IGNORE_INDEX)))
        keep_always = special(orig) & (orig != t.unk_token_id)         # [CLS]/[SEP]/[MASK]...; [UNK] goes with its word
        for b in range(B):
            n = int(am[b].sum())
            assert am[b, :n].all() and (out['input_ids'][b][~am[b]] == pad).all(), 'gaps or visible padding'
            enc, text = out['input_ids'][b, :n].tolist(), orig[b][real[b]].tolist()
            it = iter(text)
            assert all(x in it for x in enc), 'the encoder input is not a subsequence of the text'
            x = out['input_ids'][b, :n]
            assert int((special(x) & (x != t.unk_token_id)).sum()) == int((keep_always[b] & real[b]).sum())
            words = real[b] & ~keep_always[b]
            assert n - int(keep_always[b][real[b]].sum()) >= 1 or not words.any(), 'a sequence lost all its words'
        return
    L = out['input_ids'].shape[1]
    assert all(v.shape == (B, L) for k, v in out.items() if k != 't'), {k: v.shape for k, v in out.items()}
    if coll.pad_to_multiple_of: assert L % coll.pad_to_multiple_of == 0
    orig, real = _reference(refs, L, pad)
    cand = real & ~special(orig)
    lab = out['labels']
    if isinstance(coll, MLMCollator):
        assert torch.equal(out['attention_mask'].bool(), real)
        sel = lab != IGNORE_INDEX
        assert not (sel & ~cand).any(), 'a label on padding or a special token'
        assert torch.equal(lab[sel], orig[sel])
        changed = out['input_ids'] != orig
        assert not (changed & ~sel).any(), 'an unselected token (or padding) was changed'
        new = out['input_ids'][changed]
        assert ((new == t.mask_token_id) | ~special(new)).all()
    elif isinstance(coll, MaskedReconstructionCollator):
        am, dam = out['attention_mask'].bool(), out['decoder_attention_mask'].bool()
        assert torch.equal(dam, real) and torch.equal(out['input_ids'], orig) and not (am & ~dam).any()
        assert torch.equal(lab, torch.where(real, orig, torch.full_like(orig, IGNORE_INDEX)))
        deleted = dam & ~am
        assert not (deleted & ~cand).any(), 'padding or a special token was deleted'
        keeps = (am & cand).any(1) | ~cand.any(1)
        assert keeps.all(), 'a sequence lost all its tokens'
    else:
        assert torch.equal(out['input_ids'], orig)
        assert (torch.equal(out['attention_mask'].bool(), real)
                and torch.equal(out['decoder_attention_mask'].bool(), real))
        sel = lab != IGNORE_INDEX
        assert not (sel & ~cand).any() and torch.equal(lab[sel], orig[sel])
        assert (out['decoder_input_ids'][sel] == t.mask_token_id).all()
        assert torch.equal(out['decoder_input_ids'][~sel], orig[~sel])
        # issue 14 (defect 5b): a row may draw no masked token at all; forcing one biased the 1/t estimator, so a
        # row without noise is allowed and only contributes its maskable tokens to the denominator.
        assert ((out['t'] >= coll.t_min) & (out['t'] <= 1)).all()


# ======================================================================================================================
# Safe loading: nothing executes code from a checkpoint or a data file
# ======================================================================================================================
class _Payload:
    "Unpickling this object would create the marker file: the harmless stand-in for arbitrary code."
    def __init__(self, marker): self.marker = str(marker)
    def __reduce__(self): return (open, (self.marker, 'w'))


def test_pickled_code_in_weights_is_refused(good_model, tmp_path):
    marker = tmp_path / 'CODE_RAN'
    d = _variant(good_model, tmp_path, 'evil', lambda d: ((d / 'model.safetensors').unlink(),
                                                          torch.save({**read_state_dict(good_model),
                                                                      'x': _Payload(marker)},
                                                                     d / 'pytorch_model.bin')))
    for f in (read_state_dict, load_model, lambda p: classifier_from_pretrained(p),
              lambda p: CK.load_model_weights(_tiny(), p)):
        with pytest.raises(Exception, match='Weights only load failed'): f(d)
    # a transformers (non-concept) checkpoint on the GLUE path
    from transformers import BertConfig
    hf = tmp_path / 'hf'
    BertConfig(vocab_size=50, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
               intermediate_size=32).save_pretrained(hf)
    torch.save({'bert.embeddings.word_embeddings.weight': torch.zeros(50, 16), 'x': _Payload(marker)},
               hf / 'pytorch_model.bin')
    with pytest.raises(Exception, match='Weights only load failed'): G.build_classifier(str(hf), 'mrpc', tok())
    assert not marker.exists(), 'code from a checkpoint ran'


def test_pickled_code_in_training_state_is_refused(tmp_path):
    marker = tmp_path / 'CODE_RAN'
    model = _tiny()
    opt = torch.optim.AdamW(model.parameters())
    for name in ('optimizer.pt', 'scheduler.pt', 'loss_manager.pt'):
        ck = CK.save_checkpoint(tmp_path / name / 'checkpoints' / 'step-1', model, opt, state=dict(step=1))
        torch.save({'state': {}, 'x': _Payload(marker)}, ck / name)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
        with pytest.raises(Exception, match='Weights only load failed'):
            CK.load_checkpoint(ck, _tiny(), torch.optim.AdamW(model.parameters()), sched, LossManager())
    assert not marker.exists()


def test_yaml_presets_and_parameter_files_cannot_run_code(tmp_path):
    import yaml
    marker = tmp_path / 'CODE_RAN'
    evil = tmp_path / 'evil.yaml'
    evil.write_text(f"steps: !!python/object/apply:builtins.open ['{marker}', 'w']\n")
    for f in (lambda: PT.load_preset(str(evil)), lambda: R.read_preset(str(evil)),
              lambda: CLI.main(['pretrain', '--direct', '--preset', str(evil), '--runs-dir', str(tmp_path / 'runs')]),
              lambda: CLI.main(['pretrain', '--preset', str(evil), '--runs-dir', str(tmp_path / 'runs')])):
        with pytest.raises(yaml.constructor.ConstructorError): f()
    assert not marker.exists() and not (tmp_path / 'runs').exists()


def _sources():
    "(where, source) of every package module and every notebook code cell (magics dropped)."
    for f in sorted((ROOT / 'concept_nb').glob('*.py')): yield f'concept_nb/{f.name}', f.read_text()
    for nb in sorted(NBS.glob('*.ipynb')):
        for i, c in enumerate(_code_cells(nb)):
            yield f'nbs/{nb.name}[{i}]', '\n'.join(l for l in c.source.splitlines()
                                                   if not l.lstrip().startswith(('%', '!')))


UNSAFE_CALLS = {'pickle.load', 'pickle.loads', 'dill.load', 'dill.loads', 'cloudpickle.load', 'cloudpickle.loads',
                'joblib.load', 'yaml.unsafe_load', 'yaml.full_load', 'torch.jit.load', 'pd.read_pickle',
                'pandas.read_pickle',
                'marshal.loads', 'shelve.open'}


def unsafe_calls(src:str, package:bool=True) -> list[str]:
    "Calls that could run code from a file: torch.load without weights_only=True, trust_remote_code, pickle, ..."
    bad = []
    for n in ast.walk(ast.parse(src)):
        if not isinstance(n, ast.Call): continue
        f, kw = ast.unparse(n.func), {k.arg: k.value for k in n.keywords}
        true = lambda k, kw=kw: isinstance(kw.get(k), ast.Constant) and kw[k].value is True
        line = f'line {n.lineno}: {ast.unparse(n)[:100]}'
        if f.split('.')[-1] == 'load' and f.split('.')[0] in ('torch',
                                                              'th') and not true('weights_only'): bad.append(line)
        elif 'trust_remote_code' in kw and not (isinstance(kw['trust_remote_code'], ast.Constant)
                                                and kw['trust_remote_code'].value is False):
            bad.append(line)
        elif f in UNSAFE_CALLS: bad.append(line)
        elif f == 'yaml.load' and 'Safe' not in ast.unparse(kw.get('Loader', ast.Constant(''))): bad.append(line)
        elif f in ('np.load', 'numpy.load') and true('allow_pickle'): bad.append(line)
        elif package and f in ('eval', 'exec'): bad.append(line)
    return bad


def test_no_unsafe_loading_anywhere():
    assert len(unsafe_calls("torch.load(p)\ntorch.load(p, weights_only=False)\nAutoModel.from_pretrained(x, "
                            # the scan can fail
                            "trust_remote_code=True)\nyaml.load(s)\npickle.loads(b)\neval(s)")) == 6
    assert unsafe_calls("torch.load(p, map_location='cpu', weights_only=True)\nyaml.safe_load(s)\nyaml.load(s, "
                        "Loader=yaml.SafeLoader)") == []
    found, n = {}, 0
    for where, src in _sources():
        n += 1
        assert not re.search(r'trust_remote_code\s*[=:]\s*True', src), where
        bad = unsafe_calls(src, package=where.startswith('concept_nb/'))
        if bad: found[where] = bad
    assert n > 100 and not found, found


# ======================================================================================================================
# Unique run ids
# ======================================================================================================================
def _reserve_in_process(barrier, q, runs_dir):
    barrier.wait()
    q.put(str(R.reserve_run_dir(runs_dir, 'same', '2026-02-08')[0]))


def test_same_name_same_second_never_shares_a_folder(tmp_path):
    now = R.dt.datetime(2026, 2, 8, 21, 16, 33)
    full = R.launch_params('pretrain', {})[1]
    a, b = R.default_run_name('pretrain', full, now), R.default_run_name('pretrain', full, now)
    assert a == b and a.endswith('_20260208_211633')             # the name alone does not make the run unique ...
    d1, n1 = R.reserve_run_dir(tmp_path, a, now.date().isoformat())
    d2, n2 = R.reserve_run_dir(tmp_path, b, now.date().isoformat())
    assert d1 != d2 and (n1, n2) == (a, f'{a}-2') and d1.is_dir() and d2.is_dir()   # ... the reservation does
    (tmp_path / f'2026-02-08_{a}-3.ipynb').write_text('{}')     # a record whose folder was deleted still holds its id
    assert R.reserve_run_dir(tmp_path, a, '2026-02-08')[1] == f'{a}-4'
    # six processes racing for the same name at the same instant
    ctx = mp.get_context('fork')
    barrier, q = ctx.Barrier(6), ctx.Queue()
    ps = [ctx.Process(target=_reserve_in_process, args=(barrier, q, tmp_path / 'race')) for _ in range(6)]
    for p in ps: p.start()
    got = [q.get(timeout=60) for _ in ps]
    for p in ps: p.join(60)
    assert len(set(got)) == 6 and all(Path(g).is_dir() for g in got)


def test_train_cli_runs_with_the_same_name_get_their_own_folders(tmp_path, monkeypatch):
    def stop(*a, **k): raise RuntimeError('stop before training')
    monkeypatch.setattr(T, 'build_pretraining', stop)
    for _ in range(2):
        with pytest.raises(RuntimeError, match='stop before training'):
            T.run_pretraining(dict(run_name='same', device='cpu', wandb_mode='disabled'), log=QUIET, runs_dir=tmp_path)
    assert len(list(tmp_path.iterdir())) == 2
