"The sentence-transformers export (concept_nb.embeddings): the vectors of `sentence_embedding`, GLUE's zero-shot STS-B."
import os
from pathlib import Path
import numpy as np, pytest, torch

from concept_nb.embeddings import sentence_encoder_from
from concept_nb.glue import load_splits, take_subset, zero_shot_task
from concept_nb.heads import sentence_embedding

REPO = Path(__file__).resolve().parents[1]
GLUE_DIR = Path(os.environ.get('CONCEPT_NB_GLUE_DIR') or REPO.parent/'shared'/'data'/'glue')
needs_stsb = pytest.mark.skipif(not (GLUE_DIR/'STS-B'/'dev.tsv').is_file(), reason=f"{GLUE_DIR} has no STS-B/dev.tsv")
MAX_LENGTH, N_DEV = 24, 96   # short enough that some STS-B pairs are truncated


@pytest.fixture(scope='module')
def exported(st_export):
    "A tiny random concept checkpoint and its sentence-transformers export (made with the session: tests/conftest.py)."
    return st_export.ck, st_export.st, st_export.tok


def _st(path):
    from sentence_transformers import SentenceTransformer
    return SentenceTransformer(str(path), device='cpu')


def test_embeddings_equal_sentence_embedding(exported):
    ck, out, tok = exported
    st = _st(out)
    # lengths around the concept count (6) and past max_seq_length: a mask over tokens must never reach the concepts
    sents = ['yes', 'a cat', 'The cat sat on it.', 'one two three four', 'short one',
             'a long sentence, truncated at the maximum sequence length of the export: well past twenty four tokens']
    enc = sentence_encoder_from(ck).encoder
    for batch in (sents, sents[::-1], sents[:1], ['a cat', 'one two three four']):
        b = tok(batch, padding=True, truncation=True, max_length=MAX_LENGTH, return_tensors='pt')
        if len(batch) == 2: assert b['input_ids'].shape[1] == 6     # padded length = concept_num: masks must not mix
        with torch.no_grad(): ref = sentence_embedding(enc, b['input_ids'], b['attention_mask'])
        got = st.encode(batch, convert_to_tensor=True, batch_size=4)
        assert got.shape == ref.shape and torch.allclose(got, ref, atol=1e-5), (got - ref).abs().max()
    full = st.encode(sents, convert_to_tensor=True)
    assert (full[0] - full[-1]).abs().max() > 1e-4      # different sentences, different vectors


@needs_stsb
def test_zero_shot_stsb_matches_glue(exported):
    from sentence_transformers.sentence_transformer.evaluation import EmbeddingSimilarityEvaluator
    ck, out, tok = exported
    glue = zero_shot_task('stsb', str(ck), max_length=MAX_LENGTH, source=GLUE_DIR, eval_subset=N_DEV, device='cpu',
                          log=None)
    dev = take_subset(load_splits('stsb', GLUE_DIR, ('validation',))['validation'], N_DEV)   # the same pairs
    ev = EmbeddingSimilarityEvaluator(list(dev['sentence1']), list(dev['sentence2']), [float(s) for s in dev['label']],
                                      similarity_fn_names=['cosine'], batch_size=32, show_progress_bar=False)
    st = _st(out)
    assert st.max_seq_length == MAX_LENGTH
    res = ev(st)
    spearman = next(v for k, v in res.items() if k.endswith('spearman_cosine'))
    assert glue['n_dev'] == N_DEV and np.isfinite(spearman) and abs(spearman) > 0.01
    assert abs(100 * spearman - glue['final']['spearman']) < 1e-4 * 100, (spearman, glue['final'])


def test_refuses_non_concept_checkpoints(tmp_path):
    with pytest.raises(ValueError, match='tiny random model'): sentence_encoder_from('')
    with pytest.raises(FileNotFoundError, match='does not exist'): sentence_encoder_from(tmp_path/'missing')


def test_cli_export_st(exported, tmp_path, capsys):
    from concept_nb.cli import main
    ck, out, _ = exported
    assert main(['export-st', str(ck), str(tmp_path/'st'), '--max-seq-length', str(MAX_LENGTH)]) == 0
    assert (tmp_path/'st'/'modules.json').is_file() and 'SentenceTransformer(' in capsys.readouterr().out
    assert (_st(tmp_path/'st').encode(['a cat']) == _st(out).encode(['a cat'])).all()
    bad = ([str(tmp_path/'missing'), str(tmp_path/'st2')], [str(ck), str(tmp_path/'st')], ['', str(tmp_path/'st3')])
    for args, why in zip(bad, ('does not exist', 'not an empty folder', 'tiny random model'), strict=True):
        assert main(['export-st', *args]) == 1
        err = [l for l in capsys.readouterr().err.splitlines() if l.strip() and 'Loading weights' not in l]
        assert len(err) == 1 and err[0].startswith('concept-nb export-st: error:') and why in err[0], err


def test_loads_after_plain_import(st_export):     # its process started with the session (tests/conftest.py)
    out, err = st_export.plain_import.communicate(timeout=120)
    assert st_export.plain_import.returncode == 0, err[-1500:]
    assert f'(1, 32) {MAX_LENGTH}' in out, out
