"""Collators on real tokenizer output from the embedded corpus: count what each collator did, check padding is never
content, and check that a sequence gets the same noise however it is padded."""
import random
from functools import lru_cache

import pytest
import torch
from hypothesis import HealthCheck, given, settings, strategies as st

from concept_nb.collators import (IGNORE_INDEX, BaseCollator, DiffusionCollator, MLMCollator, PrefixDiffusionCollator,
                                  TSDAECollator, WordBoundaries, collator_for, show_batch, word_index)
from concept_nb.data import embedded_texts, load_tokenizer


@lru_cache(None)
def tokenizer(kind='wordpiece'):
    return load_tokenizer('embedded' if kind == 'wordpiece' else 'embedded-bpe')

@lru_cache(None)
def docs():
    return embedded_texts('train')[:600]

@lru_cache(None)
def encodings(kind='wordpiece', n=400, max_length=160, seed=0):
    "Real documents tokenised and cut at random lengths (8..max_length), so batches are ragged and padded."
    rng, tok = random.Random(seed), tokenizer(kind)
    return tuple(tok(d, truncation=True, max_length=rng.randint(8, max_length)) for d in docs()[:n])

def feats(kind='wordpiece', **kw):
    return [dict(input_ids=list(e['input_ids']), attention_mask=list(e['attention_mask']))
            for e in encodings(kind, **kw)]

def run(coll, features, bs=16, passes=1):
    "Yield (features, batch) over `passes` passes of `features` in batches of `bs`."
    for _ in range(passes):
        for i in range(0, len(features), bs):
            fs = features[i:i + bs]
            yield fs, coll(fs)

def real_mask(fs, L):
    "Real-token mask built independently from the features' own lengths."
    m = torch.zeros(len(fs), L, dtype=torch.bool)
    for b, f in enumerate(fs): m[b, :len(f['input_ids'])] = True
    return m

def padded(fs, L, pad):
    x = torch.full((len(fs), L), pad, dtype=torch.long)
    for b, f in enumerate(fs): x[b, :len(f['input_ids'])] = torch.tensor(f['input_ids'])
    return x

def special(tok, ids):
    return torch.isin(ids, torch.tensor(tok.all_special_ids))

# ---------------------------------------------------------------- MLM

def test_mlm_token_rates_and_80_10_10():
    tok = tokenizer()
    coll = MLMCollator(tok, seed=0)
    n_cand = n_sel = n_mask = n_rand = n_keep = 0
    for fs, out in run(coll, feats(), passes=3):
        ids, lab, am = out['input_ids'], out['labels'], out['attention_mask'].bool()
        clean = padded(fs, ids.shape[1], tok.pad_token_id)
        real = real_mask(fs, ids.shape[1])
        assert torch.equal(am, real)
        sel = lab != IGNORE_INDEX
        cand = real & ~special(tok, clean)
        assert not (sel & ~cand).any(), "labels only on real, non-special tokens"
        assert torch.equal(lab[sel], clean[sel])
        assert torch.equal(ids[~sel], clean[~sel]), "unselected tokens (padding, specials) unchanged"
        rand = sel & (ids != tok.mask_token_id) & (ids != clean)
        assert not special(tok, ids[rand]).any(), "random replacements are never special tokens"
        n_cand += int(cand.sum()); n_sel += int(sel.sum())
        n_mask += int((sel & (ids == tok.mask_token_id)).sum()); n_rand += int(rand.sum())
        n_keep += int((sel & (ids == clean)).sum())
    assert n_cand > 50_000
    assert abs(n_sel / n_cand - 0.15) < 0.006, n_sel / n_cand
    assert abs(n_mask / n_sel - 0.8) < 0.02 and abs(n_rand / n_sel - 0.1) < 0.015 and abs(n_keep / n_sel - 0.1) < 0.015


@pytest.mark.parametrize('kind', ['wordpiece', 'bpe'])
def test_whole_word_masks_whole_words(kind):
    "Every word of the tokenizer's own `word_ids()` is either fully a target or not at all; the token rate is ~p."
    tok = tokenizer(kind)
    encs = encodings(kind)
    ref = [[-1 if w is None else w for w in e.word_ids()] for e in encs]
    coll = MLMCollator(tok, masking='whole_word', mlm_probability=0.2, seed=1)
    fs = feats(kind)
    n_cand = n_sel = n_words = n_split = 0
    for _ in range(2):
        for i in range(0, len(fs), 16):
            out = coll(fs[i:i + 16])
            sel = out['labels'] != IGNORE_INDEX
            for b, r in enumerate(ref[i:i + 16]):
                r = torch.tensor(r)
                s = sel[b, :len(r)]
                assert not s[len(r):].any() if len(s) > len(r) else True
                cand = r >= 0
                n_cand += int(cand.sum()); n_sel += int(s.sum())
                for w in r[cand].unique():
                    n_words += 1
                    n_split += s[r == w].unique().numel() > 1
    assert n_split == 0, f"{n_split} of {n_words} words were partly masked"
    assert abs(n_sel / n_cand - 0.2) < 0.015, n_sel / n_cand


@pytest.mark.parametrize('kind', ['wordpiece', 'bpe'])
def test_word_boundaries_match_tokenizer_word_ids(kind):
    "Word grouping from token strings alone equals (WordPiece) or is at most coarser than (BPE) the tokenizer's words."
    tok = tokenizer(kind)
    wb, bc = WordBoundaries(tok), BaseCollator(tok)
    assert wb.scheme == {'wordpiece': 'wordpiece', 'bpe': 'byte_level'}[kind]
    equal = total = 0
    for e in encodings(kind):
        ids = torch.tensor([e['input_ids']])
        cand = ~bc.is_special(ids)
        ours = word_index(wb(ids, cand), cand)[0]
        ref = torch.tensor([-1 if w is None else w for w in e.word_ids()])
        total += 1; equal += torch.equal(ours, ref)
        for w in ref[ref >= 0].unique(): assert ours[ref == w].unique().numel() == 1
    assert equal == total if kind == 'wordpiece' else equal / total > 0.95


def test_word_boundaries_metaspace():
    "SentencePiece-style '▁' vocabularies (trained here on the same corpus, byte fallback on): words match word_ids()."
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast
    t = Tokenizer(models.BPE(unk_token='[UNK]', byte_fallback=True))
    t.pre_tokenizer, t.decoder = pre_tokenizers.Metaspace(), decoders.Metaspace()
    t.train_from_iterator(docs()[:500],
                          trainers.BpeTrainer(vocab_size=2000,
                                              special_tokens=['[PAD]', '[UNK]', '[CLS]', '[SEP]', '[MASK]']))
    t.post_processor = processors.TemplateProcessing(single='[CLS] $A [SEP]',
                                                     special_tokens=[('[CLS]', 2), ('[SEP]', 3)])
    tok = PreTrainedTokenizerFast(tokenizer_object=t, pad_token='[PAD]', unk_token='[UNK]', cls_token='[CLS]',
                                  sep_token='[SEP]', mask_token='[MASK]')
    coll = MLMCollator(tok, masking='whole_word')
    for d in docs()[500:600]:
        e = tok(d, truncation=True, max_length=128)
        ids = torch.tensor([e['input_ids']])
        ours = coll.word_ids(ids, torch.ones_like(ids, dtype=torch.bool))[0]
        ref = torch.tensor([-1 if w is None else w for w in e.word_ids()])
        keep = ours >= 0                                  # [UNK] pieces are never targets; the rest of their word is
        assert torch.equal(ours[keep], ref[keep] - ref[keep][0] if keep.any() else ref[keep])
    assert coll._words.scheme == 'metaspace'


def test_whole_word_uses_feature_word_ids():
    tok = tokenizer()
    f = feats()[5]
    n = len(f['input_ids'])
    wid = [None] + [j // 4 for j in range(n - 2)] + [None]      # words of 4 tokens, whatever the strings say
    coll = MLMCollator(tok, masking='whole_word', mlm_probability=0.5, seed=0)
    sel = coll([dict(f, word_ids=wid)])['labels'][0] != IGNORE_INDEX
    groups = sel[1:n - 1].reshape(-1)
    for k in range(0, n - 2, 4): assert groups[k:k + 4].unique().numel() == 1
    assert 0 < groups.sum() < n - 2


def test_span_masking():
    tok = tokenizer()
    coll = MLMCollator(tok, masking='span', mlm_probability=0.3, span_length=(3, 10), seed=0)
    n_cand = n_sel = in_long_runs = 0
    for fs, out in run(coll, feats(), passes=2):
        sel = out['labels'] != IGNORE_INDEX
        clean = padded(fs, sel.shape[1], tok.pad_token_id)
        cand = real_mask(fs, sel.shape[1]) & ~special(tok, clean)
        assert not (sel & ~cand).any()
        assert ((sel.sum(1) - 0.3 * cand.sum(1)).abs() < 1).all(), "exact count up to stochastic rounding"
        n_cand += int(cand.sum()); n_sel += int(sel.sum())
        for b in range(len(fs)):
            s = sel[b][cand[b]].tolist() + [False]
            run_len = 0
            for x in s:
                if x: run_len += 1
                else:
                    if run_len >= 3: in_long_runs += run_len
                    run_len = 0
    assert abs(n_sel / n_cand - 0.3) < 0.003, n_sel / n_cand
    assert in_long_runs / n_sel > 0.9, "most targets lie in contiguous spans of >= 3 tokens"

# ---------------------------------------------------------------- TSDAE (words deleted, survivors closed up)

def kept_words(units, kept):
    """Most words of `units` ((tokens, must_keep) per word or special token, in order) that `kept` keeps when it is
    `units` with some optional words dropped *whole*; None when no such reading exists (a word was cut)."""
    reach = {0: 0}                                                  # position in kept -> words kept so far
    for toks, must in units:
        nxt = {} if must else dict(reach)
        for j, n in reach.items():
            if tuple(kept[j:j + len(toks)]) == toks:
                nxt[j + len(toks)] = max(nxt.get(j + len(toks), -1), n + (not must))
        reach = nxt
    return reach.get(len(kept))

def word_units(ids, word_ids):
    "The words of one sequence as (tokens, must_keep) units, from the tokenizer's own word ids; specials are must-keep."
    units = []
    for i, (x, w) in enumerate(zip(ids, word_ids)):
        if w is not None and i and word_ids[i - 1] == w: units[-1] = (units[-1][0] + (x,), False)
        else: units.append(((x,), w is None))
    return units

@pytest.mark.parametrize('kind', ['wordpiece', 'bpe'])
def test_tsdae_deletes_whole_words_and_closes_up(kind):
    """issue 14, defect 4: `tsdae` deleted single tokens and only hid them through the attention mask, so the encoder
    saw the gaps at their original positions. Now whole words go (each with probability 0.6, at least one kept), the
    encoder gets the survivors closed up (no hidden token inside the attended span, consecutive positions, length =
    number of survivors) and the labels are the original sequence. WordPiece words come from the collator's own word
    scheme (the packed-block path), checked against the tokenizer's word ids; BPE features carry `word_ids`."""
    tok = tokenizer(kind)
    coll = collator_for('tsdae', tok, seed=0)
    encs = encodings(kind)
    fs = [dict(input_ids=list(e['input_ids']), attention_mask=list(e['attention_mask']),
               **({'word_ids': e.word_ids()} if kind == 'bpe' else {})) for e in encs]
    n_words = n_del = 0
    expected = 0.0
    for i in range(0, len(fs), 16):
        out = coll(fs[i:i + 16])
        ids, am, lab = out['input_ids'], out['attention_mask'].bool(), out['labels']
        real = real_mask(fs[i:i + 16], lab.shape[1])
        clean = padded(fs[i:i + 16], lab.shape[1], tok.pad_token_id)
        assert torch.equal(lab, torch.where(real, clean, torch.full_like(clean, IGNORE_INDEX))), "labels: the original"
        assert torch.equal(out['decoder_attention_mask'].bool(), real)
        n_enc = am.sum(1)
        assert ids.shape[1] == int(n_enc.max()), "encoder input padded to the longest survivor list"
        for b, e in enumerate(encs[i:i + 16]):
            n = int(n_enc[b])
            assert am[b, :n].all() and not am[b, n:].any(), "no hidden token inside the encoder's span: closed up"
            assert (ids[b, n:] == tok.pad_token_id).all()
            units = word_units(e['input_ids'], e.word_ids())
            k = kept_words(units, tuple(ids[b, :n].tolist()))
            assert k is not None, "survivors are the original with whole words removed ([CLS]/[SEP] kept)"
            w = sum(not must for _, must in units)
            assert k >= 1 or w == 0, "at least one word survives"
            n_words += w; n_del += w - k
            expected += 0.6 * w - 0.6 ** w                          # one word comes back when all were drawn
    assert abs(n_del / n_words - expected / n_words) < 0.01, (n_del / n_words, expected / n_words)


def test_tsdae_keeps_one_whole_word_in_short_rows():
    "issue 14, defect 4: the lone survivor of a row is a whole word (all its pieces), never a piece of one."
    tok = tokenizer()
    coll = collator_for('tsdae', tok, deletion_rate=0.99, seed=0)
    cls, sep, x = tok.cls_token_id, tok.sep_token_id, tok.convert_tokens_to_ids('the')
    long_word = tok('Unbelievably')['input_ids']                    # [CLS] + several pieces of one word + [SEP]
    assert len(long_word) >= 5
    out = coll([[cls, sep], [cls, x, sep], long_word, [cls, x, x, x, sep]])
    am, ids = out['attention_mask'], out['input_ids']
    assert am.sum(1).tolist() == [2, 3, len(long_word), 3]         # nothing to delete / lone word / all its pieces
    assert (ids[2].tolist() == long_word and ids[1, :3].tolist() == [cls, x, sep]
            and ids[3, :3].tolist() == [cls, x, sep])
    assert out['labels'].shape == (4, len(long_word)) and out['labels'][3, :5].tolist() == [cls, x, x, x, sep]


def test_masked_reconstruction_reproduces_the_old_tsdae_batches():
    """issue 14, defect 4: the former behaviour stays as objective `masked_reconstruction`: with the same seed it gives
    exactly the tensors the old TSDAECollator gave (digests recorded from it, token-level and whole-word, WordPiece and
    BPE, 4 batches of 16 ragged documents each). Recorded again from the old collator (`git show fc05e66^:concept_nb/
    collators.py`) when tokenizer training became deterministic (cache `-v2`): the ids changed, the collator did not."""
    import hashlib
    want = {'wordpiece': ('5435468b39fcd4f7', '89f11fba56b2335e'), 'bpe': ('f4576cec0d8621d1', 'e2f891c6a9e1f24b')}
    for kind, (tok_level, whole_word) in want.items():
        t = tokenizer(kind)
        got = []
        for coll in (collator_for('masked_reconstruction', t, seed=3),
                     collator_for('masked_reconstruction', t, whole_word=True, pad_to_multiple_of=8, seed=4)):
            h = hashlib.sha256()
            for i in range(0, 64, 16):
                out = coll(feats(kind)[i:i + 16])
                for k in sorted(out): h.update(k.encode()); h.update(out[k].numpy().tobytes())
            got.append(h.hexdigest()[:16])
        assert tuple(got) == (tok_level, whole_word), kind


@pytest.mark.parametrize('whole_word', [False, True])
def test_masked_reconstruction_hides_in_place(whole_word):
    tok = tokenizer()
    coll = collator_for('masked_reconstruction', tok, deletion_rate=0.6, whole_word=whole_word, seed=0)
    n_cand = n_del = 0
    for fs, out in run(coll, feats()):
        ids, vis, lab = out['input_ids'], out['attention_mask'].bool(), out['labels']
        real = real_mask(fs, ids.shape[1])
        clean = padded(fs, ids.shape[1], tok.pad_token_id)
        assert torch.equal(ids, clean), "input_ids stay clean"
        assert torch.equal(out['decoder_attention_mask'].bool(), real)
        assert not (vis & ~real).any(), "padding never visible"
        assert torch.equal(lab != IGNORE_INDEX, real) and torch.equal(lab[real], clean[real]), "dense labels, real only"
        spec = special(tok, clean) & real
        assert torch.equal(vis[spec], spec[spec]), "specials never deleted"
        cand = real & ~spec
        assert ((vis & cand).sum(1) >= 1).all(), "at least one token survives"
        n_cand += int(cand.sum()); n_del += int((cand & ~vis).sum())
    assert abs(n_del / n_cand - 0.6) < (0.015 if not whole_word else 0.03), n_del / n_cand

# ---------------------------------------------------------------- diffusion

def test_diffusion_rates_follow_t():
    tok = tokenizer()
    coll = DiffusionCollator(tok, t_min=0.3, seed=0)
    ts, fracs, n_cand, n_masked, expected = [], [], 0, 0, 0.0
    for fs, out in run(coll, feats(), passes=3):
        ids, dec, lab, t = out['input_ids'], out['decoder_input_ids'], out['labels'], out['t']
        real = real_mask(fs, ids.shape[1])
        clean = padded(fs, ids.shape[1], tok.pad_token_id)
        assert torch.equal(ids, clean) and torch.equal(out['attention_mask'].bool(), real)
        assert torch.equal(out['decoder_attention_mask'].bool(), real)
        noised = dec != clean
        assert torch.equal(noised, lab != IGNORE_INDEX) and torch.equal(lab[noised], clean[noised])
        assert (dec[noised] == tok.mask_token_id).all()
        cand = real & ~special(tok, clean)
        assert not (noised & ~cand).any(), "padding and specials never noised"
        assert (noised.sum(1) >= 1).all()
        assert t.dtype == torch.float32 and ((t >= 0.3) & (t <= 1.0)).all()
        ts += t.tolist(); fracs += (noised.sum(1) / cand.sum(1)).tolist()
        n_cand += int(cand.sum()); n_masked += int(noised.sum()); expected += float((t * cand.sum(1)).sum())
    ts, fracs = torch.tensor(ts), torch.tensor(fracs)
    assert abs(ts.mean() - 0.65) < 0.025, ts.mean()
    assert abs(n_masked / n_cand - expected / n_cand) < 0.01, (n_masked / n_cand, expected / n_cand)
    assert abs(fracs.mean() - ts.mean()) < 0.02
    assert torch.corrcoef(torch.stack([ts, fracs]))[0, 1] > 0.8, "each sample's masked fraction tracks its own t"


def test_diffusion_eps_and_fixed_t():
    tok = tokenizer()
    coll = DiffusionCollator(tok, t_min=0.5, t_max=0.5, eps=0.2, seed=3)
    n_cand = n_masked = 0
    for fs, out in run(coll, feats(), passes=2):
        assert torch.allclose(out['t'], torch.full_like(out['t'], 0.6)), "t is the masking probability (1-eps)t+eps"
        clean = padded(fs, out['input_ids'].shape[1], tok.pad_token_id)
        cand = real_mask(fs, clean.shape[1]) & ~special(tok, clean)
        n_cand += int(cand.sum()); n_masked += int((out['labels'] != IGNORE_INDEX).sum())
    assert abs(n_masked / n_cand - 0.6) < 0.01


def test_prefix_diffusion():
    tok = tokenizer()
    coll = PrefixDiffusionCollator(tok, prefix_frac=(0.3, 0.5), t_min=0.3, seed=0)
    fracs, n_cand, n_masked, expected = [], 0, 0, 0.0
    fs_all = [f for f in feats() if len(f['input_ids']) >= 10]
    for fs, out in run(coll, fs_all, passes=2):
        n_pre, n_suf = out['attention_mask'].sum(1), out['decoder_attention_mask'].sum(1)
        dec, lab = out['decoder_input_ids'], out['labels']
        assert lab.shape == dec.shape == out['decoder_attention_mask'].shape and len(out['t']) == len(fs)
        for b, f in enumerate(fs):
            x = f['input_ids']; n = len(x)
            assert n_pre[b] + n_suf[b] == n
            assert 0.3 * n - 1 <= n_pre[b] <= 0.5 * n + 1
            k, m = int(n_pre[b]), int(n_suf[b])
            assert out['input_ids'][b, :k].tolist() == x[:k] and (out['input_ids'][b, k:] == tok.pad_token_id).all()
            # decoder positions count from the suffix start; labels only on masked suffix tokens
            sel = lab[b] != IGNORE_INDEX
            assert not sel[m:].any() and (dec[b, m:] == tok.pad_token_id).all()
            assert (dec[b][sel] == tok.mask_token_id).all()
            assert torch.where(sel, lab[b], dec[b])[:m].tolist() == x[k:]
            cand = ~special(tok, torch.tensor(x[k:]))
            assert not (sel[:m] & ~cand).any()              # a row may get no mask (none is forced, issue 14)
            n_cand += int(cand.sum()); n_masked += int(sel.sum()); expected += float(out['t'][b]) * int(cand.sum())
            fracs.append(k / n)
    assert abs(sum(fracs) / len(fracs) - 0.4) < 0.02
    assert abs(n_masked / n_cand - expected / n_cand) < 0.015
    with pytest.raises(ValueError, match='at least 2'): coll([[tok.cls_token_id]])

# ---------------------------------------------------------------- padding invariance (property tests)

KINDS = {
    'mlm': lambda tok, s: MLMCollator(tok, mlm_probability=0.3, seed=s),
    'wwm': lambda tok, s: MLMCollator(tok, masking='whole_word', mlm_probability=0.3, seed=s),
    'span': lambda tok, s: MLMCollator(tok, masking='span', mlm_probability=0.3, seed=s),
    'tsdae': lambda tok, s: TSDAECollator(tok, seed=s),
    'mrec': lambda tok, s: collator_for('masked_reconstruction', tok, seed=s),
    'diffusion': lambda tok, s: DiffusionCollator(tok, seed=s),
    'prefix': lambda tok, s: PrefixDiffusionCollator(tok, seed=s),
}

def mask_key(kind, key):
    "Which mask says where `key` holds real tokens."
    if kind == 'mrec' and key != 'decoder_attention_mask': return 'decoder_attention_mask'   # hidden in place
    decoder_side = key.startswith('decoder') or (kind in ('prefix', 'tsdae') and key == 'labels')   # TSDAE: closed up
    return 'decoder_attention_mask' if decoder_side else 'attention_mask'

def rows(out, kind, b):
    "Sample b of a batch: every key at the positions its mask calls real, plus t."
    return {k: (float(v[b]) if k == 't' else v[b][out[mask_key(kind, k)][b].bool()].tolist()) for k, v in out.items()}

def check_padding_untouched(out, kind, pad):
    for key, val in out.items():
        if key == 't': continue
        fill = IGNORE_INDEX if key == 'labels' else pad if 'input_ids' in key else 0
        assert (val[~out[mask_key(kind, key)].bool()] == fill).all(), f"{kind}/{key}: non-padding outside real tokens"

@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(kind=st.sampled_from(sorted(KINDS)), tk=st.sampled_from(['wordpiece', 'bpe']), doc=st.integers(0, 298),
       length=st.integers(3, 80), extra=st.integers(1, 40), partner=st.integers(81, 140), seed=st.integers(0, 10**6))
def test_padding_invariance(kind, tk, doc, length, extra, partner, seed):
    "A sequence gets identical masks/noise for its real tokens however it is padded and whoever shares its batch."
    tok = tokenizer(tk)
    x = tok(docs()[doc], truncation=True, max_length=length)['input_ids']
    n, pad = len(x), tok.pad_token_id
    long_ = tok(docs()[doc + 300], truncation=True, max_length=partner)['input_ids']
    short = tok(docs()[doc + 301], truncation=True, max_length=3)['input_ids']
    pre = dict(input_ids=x + [pad] * extra, attention_mask=[1] * n + [0] * extra)
    first = {   # the sequence is sample 0
        'bare': [x],
        'longer_partner': [x, long_],
        'prepadded': [pre, long_],
        'prepadded_no_mask': [dict(input_ids=x + [pad] * extra)],                 # [PAD] ids are never content
        'left_padded': [dict(input_ids=[pad] * extra + x, attention_mask=[0] * extra + [1] * n)],
    }
    second = {  # the sequence is sample 1, after partners of different lengths
        'after_long': [long_, x],
        'after_short': [short, pre],
        'after_short_upstream_style': [short + [pad] * (len(x) + extra - len(short)), x + [pad] * extra],
    }
    for group, b in ((first, 0), (second, 1)):
        ref = None
        for name, fs in group.items():
            out = KINDS[kind](tok, seed)(fs)
            check_padding_untouched(out, kind, pad)
            got = rows(out, kind, b)
            if ref is None: ref = got
            assert got == ref, f"{kind}/{name}: sample {b} differs from {next(iter(group))}"

@pytest.mark.parametrize('kind', sorted(KINDS))
def test_upstream_style_prepadded_batches(kind):
    "Upstream padded every document to a fixed length first; here such padding stays padding and is trimmed away."
    tok = tokenizer()
    encs = [tok(d, truncation=True, max_length=128, padding='max_length') for d in docs()[:64]]
    for use_mask in (True, False):
        for i in range(0, 64, 16):
            fs = [dict(input_ids=e['input_ids'], **({'attention_mask': e['attention_mask']} if use_mask else {}))
                  for e in encs[i:i + 16]]
            n_real = torch.tensor([sum(e['attention_mask']) for e in encs[i:i + 16]])
            out = KINDS[kind](tok, i)(fs)
            check_padding_untouched(out, kind, tok.pad_token_id)
            if kind == 'prefix':
                got = out['attention_mask'].sum(1) + out['decoder_attention_mask'].sum(1)
            elif kind == 'tsdae':                                   # the labels hold the text, the encoder a subset
                got = out['decoder_attention_mask'].sum(1)
                assert out['labels'].shape[1] == n_real.max() and (out['attention_mask'].sum(1) < n_real).all()
            else:
                got = out[mask_key(kind, 'input_ids')].sum(1)
                assert out['input_ids'].shape[1] == n_real.max(), "trimmed to the longest real sequence"
            assert torch.equal(got, n_real), "exactly the real tokens count as real"
            labelled = out['labels'] != IGNORE_INDEX
            lab_ids = out['labels'][labelled]
            assert not (lab_ids == tok.pad_token_id).any(), "[PAD] is never a target"

# ---------------------------------------------------------------- misc

def test_pad_to_multiple_of_and_reproducibility():
    tok = tokenizer()
    fs = feats()[:8]
    for kind, make in KINDS.items():
        coll = make(tok, 7)
        coll.pad_to_multiple_of = 16
        a = coll(fs)
        assert all(v.shape[1] % 16 == 0 for k, v in a.items() if k != 't'), kind
        b, c = make(tok, 7), make(tok, 8)
        b.pad_to_multiple_of = c.pad_to_multiple_of = 16
        b = b(fs); c = c(fs)
        assert all(torch.equal(a[k], b[k]) for k in a), f"{kind}: same seed, same batch"
        assert any(not torch.equal(a[k], c[k]) for k in a), f"{kind}: another seed, another batch"
    torch.manual_seed(0); a = MLMCollator(tok)(fs)
    torch.manual_seed(0); b = MLMCollator(tok)(fs)
    assert torch.equal(a['labels'], b['labels']), "seed=None follows torch.manual_seed"


def test_dataloader_workers_draw_different_noise():
    tok = tokenizer()
    f = feats()[3]
    dl = torch.utils.data.DataLoader([f] * 8, batch_size=4, num_workers=2,
                                     collate_fn=MLMCollator(tok, mlm_probability=0.5, seed=0))
    b0, b1 = list(dl)
    assert not torch.equal(b0['labels'], b1['labels']), "two workers with one seed must not repeat each other"


def test_collator_for_and_errors():
    tok = tokenizer()
    assert isinstance(collator_for('mlm', tok), MLMCollator)
    assert isinstance(collator_for('tsdae', tok), TSDAECollator)
    assert type(collator_for('masked_reconstruction', tok)).__name__ == 'MaskedReconstructionCollator'
    assert isinstance(collator_for('diffusion', tok, t_min=0.1), DiffusionCollator)
    assert isinstance(collator_for('prefix_diffusion', tok), PrefixDiffusionCollator)
    with pytest.raises(ValueError, match="unknown objective 'bert'.*masked_reconstruction.*tsdae"):
        collator_for('bert', tok)
    coll = MLMCollator(tok)
    with pytest.raises(ValueError, match='non-empty'): coll([])
    with pytest.raises(ValueError, match="no 'input_ids'"): coll([dict(ids=[1, 2])])
    with pytest.raises(ValueError, match='attention_mask'): coll([dict(input_ids=[2, 5, 3], attention_mask=[1, 1])])
    with pytest.raises(ValueError, match='1-D'): coll([dict(input_ids=[[2, 5, 3]])])
    with pytest.raises(ValueError, match='prefix_frac'): PrefixDiffusionCollator(tok, prefix_frac=(0.6, 0.4))
    with pytest.raises(ValueError, match='pad_to_multiple_of'): TSDAECollator(tok, pad_to_multiple_of=0)


@pytest.mark.parametrize('objective,model,kw', [('mlm', 'perceiver_mlm', {}),
                                                 ('mlm', 'perceiver_mlm', {'masking': 'span'}),
                                                 ('tsdae', 'tsdae_posonly', {}), ('diffusion', 'diffusion_mlm', {}),
                                                 ('masked_reconstruction', 'masked_reconstruction_posonly', {}),
                                                 ('prefix_diffusion', 'diffusion_mlm', {})])
def test_batches_feed_the_models(objective, model, kw):
    "Each collator's batch goes straight into the matching registry model: finite loss, gradients flow."
    from concept_nb.heads import build_model
    tok = tokenizer()
    torch.manual_seed(0)
    m = build_model(model, vocab_size=len(tok), concept_num=4, hidden_size=32, num_hidden_layers=1,
                    num_attention_heads=2, intermediate_size=64, max_sequence_length=256, pad_token_id=tok.pad_token_id,
                    mask_token_id=tok.mask_token_id, cls_token_id=tok.cls_token_id, sep_token_id=tok.sep_token_id)
    batch = collator_for(objective, tok, seed=0, **kw)(feats()[:6])
    out = m(**batch)
    assert torch.isfinite(out.loss) and out.concepts.shape == (6, 4, 32)
    out.loss.backward()


def test_show_batch_marks_every_change():
    tok = tokenizer()
    fs = feats()[:2]
    text = show_batch(MLMCollator(tok, seed=0)(fs), tok)
    assert '«[MASK]|' in text
    out = TSDAECollator(tok, seed=0)(fs)
    text = show_batch(out, tok, max_tokens=1000)                    # deleted = in the labels, not in the encoder input
    assert text.count('[-') == int(out['decoder_attention_mask'][0].sum() - out['attention_mask'][0].sum()) > 0
    assert '[-' in show_batch(collator_for('masked_reconstruction', tok, seed=0)(fs), tok)
    out = PrefixDiffusionCollator(tok, seed=0)(fs)
    assert show_batch(out, tok).startswith('encoder: [CLS]') and '(t=' in show_batch(out, tok)


def test_diffusion_noise_is_unbiased_on_short_sequences():
    """issue 14, defect 5b: no masked token is forced into a row that drew none, so the 1/t estimator stays unbiased:
    per row, E[#masked / t] = #maskable. With a fixed per-token CE c_i the estimator sum_masked(c_i / t) / #maskable has
    expectation sum(c_i) / #maskable, the clean value. Monte Carlo over 2,000 short rows ('[CLS] a b [SEP]' and its
    prefix-diffusion suffix), tolerance 4 standard errors; forcing one mask raised it by ~18% here."""
    import math
    tok = tokenizer()
    words = [i for i in range(10, 400) if i not in tok.all_special_ids][:40]
    rows = [dict(input_ids=[tok.cls_token_id, words[i % 40], words[(7 * i + 3) % 40], tok.sep_token_id])
            for i in range(2000)]
    ce = torch.zeros(len(tok)); ce[words] = torch.linspace(0.5, 4.0, len(words))       # a fixed CE per token id
    for coll in (DiffusionCollator(tok, t_min=0.3, seed=0),
                 PrefixDiffusionCollator(tok, prefix_frac=(0.3, 0.5), seed=0)):
        out = coll(rows)
        ids = torch.where(out['labels'] != IGNORE_INDEX, out['labels'], out['decoder_input_ids'])   # clean decoder text
        maskable = out['decoder_attention_mask'].bool() & ~special(tok, ids)
        hit = out['labels'] != IGNORE_INDEX
        est = (ce[ids] * hit).sum(1) / out['t'] / maskable.sum(1)           # each row's estimate
        clean = (ce[ids] * maskable).sum(1) / maskable.sum(1)               # its exact expectation
        err = est - clean
        se = err.std().item() / math.sqrt(len(err))
        assert abs(err.mean().item()) < 4 * se, (type(coll).__name__, err.mean().item(), se)
        assert (hit <= maskable).all() and (~hit.any(1)).any()            # some rows drew no mask, and keep none
