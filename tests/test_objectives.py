"""The pretraining objectives end to end (issue 9): collator + model on real tokenizer output. Padding is never noised,
deleted, attended or labelled; the MDLM estimator is its formula; `generate` fills every mask and leaves the context
alone; the prefix objective's loss reads only the suffix; a TSDAE run warm-starts from an MLM encoder exactly."""
import json, math, os
from functools import lru_cache

import pytest
import torch
import torch.nn as nn

from concept_nb.collators import IGNORE_INDEX, collator_for
from concept_nb.data import embedded_texts, load_tokenizer
from concept_nb.heads import build_model, diffusion_loss, load_model, read_state_dict
from concept_nb.checkpoints import init_encoder_from
from concept_nb.pretrain import PRETRAIN_RULES, PRETRAIN_TYPES, build_pretraining, resolve_params
from concept_nb.train import run_pretraining
from concept_nb.core import ParamError, check_params

torch.set_num_threads(1)
os.environ.setdefault('WANDB_MODE', 'disabled')


@lru_cache(None)
def tok():
    return load_tokenizer('embedded')

@lru_cache(None)
def texts():
    return embedded_texts('train')[:40]

def features(lengths, prepad:int=0, with_mask:bool=True):
    ("Real documents cut to `lengths` tokens; `prepad` > 0 pads each one to that length first (the upstream dataset "
     "bug).")
    t, out = tok(), []
    for i, n in enumerate(lengths):
        ids = t(texts()[i], truncation=True, max_length=n)['input_ids']
        assert len(ids) == n, 'document too short for the test'
        am = [1] * n
        if prepad: ids, am = ids + [t.pad_token_id] * (prepad - n), am + [0] * (prepad - n)
        out.append(dict(input_ids=ids, attention_mask=am) if with_mask else dict(input_ids=ids))
    return out

def small_config(**kw):
    t = tok()
    return dict(vocab_size=len(t), hidden_size=32, concept_num=4, num_hidden_layers=2, num_attention_heads=2,
                intermediate_size=64, max_sequence_length=160, pad_token_id=t.pad_token_id,
                mask_token_id=t.mask_token_id,
                cls_token_id=t.cls_token_id, sep_token_id=t.sep_token_id, tokenizer_name='embedded', **kw)

def model_for(name, seed=0, **kw):
    """A small model in eval mode. AdaLN-Zero starts every denoiser block as the identity, so an untrained diffusion
    decoder ignores the concepts: its modulation is randomised here, as training would, so that tests see the concepts'
    effect."""
    torch.manual_seed(seed)
    model = build_model(name, **small_config(**kw)).eval()
    for m in model.modules():
        if hasattr(m, 'ada'): nn.init.normal_(m.ada.weight, std=0.2); nn.init.normal_(m.ada.bias, std=0.2)
    return model

OBJECTIVES = [  # (objective, model type, config overrides, collator kwargs)
    ('mlm', 'perceiver_posonly_mlm', {}, dict(mlm_probability=0.3)),
    ('tsdae', 'tsdae_posonly', {}, dict(deletion_rate=0.6)),
    ('tsdae', 'tsdae_posonly', dict(use_bixt=True), dict(deletion_rate=0.6)),
    ('masked_reconstruction', 'masked_reconstruction_posonly', {}, dict(deletion_rate=0.6)),
    ('diffusion', 'diffusion_mlm', {}, dict(t_min=0.3)),
    ('diffusion', 'diffusion_mlm', dict(use_bixt=True), dict(t_min=0.3)),
    ('prefix_diffusion', 'diffusion_mlm', {}, dict(t_min=0.3)),
]
IDS = ['mlm-posonly', 'tsdae', 'tsdae-bixt', 'masked-reconstruction', 'diffusion', 'diffusion-bixt', 'prefix-diffusion']
LENGTHS = [70, 23, 41]

def _rows_of(batch, b, closed=False):
    """Row b of a batch cut to its own real length (encoder side and decoder side separately), as a batch of one.
    `closed`: the labels lay out the whole text and the encoder input only the survivors (TSDAE)."""
    am, dm = batch['attention_mask'][b].bool(), batch.get('decoder_attention_mask')
    seq2seq = 'decoder_input_ids' in batch
    hidden = dm is not None and not seq2seq and not closed               # masked reconstruction: hidden tokens are text
    real = am | dm[b].bool() if hidden else am
    n_enc = int(real.nonzero().max()) + 1
    n_dec = int(dm[b].nonzero().max()) + 1 if seq2seq or closed else None
    out = {}
    for k, v in batch.items():
        if k == 't': out[k] = v[b:b + 1]
        elif (seq2seq or closed) and (k.startswith('decoder_') or k == 'labels'): out[k] = v[b:b + 1, :n_dec]
        else: out[k] = v[b:b + 1, :n_enc]
    return out

def _n_loss_terms(batch, objective):
    "How a row's loss is weighted in the batch loss: labelled rows (MLM/TSDAE means) or maskable decoder tokens (MDLM)."
    if objective in ('diffusion', 'prefix_diffusion'):      # real, non-special: [CLS]/[SEP] are never noised (issue 14)
        t, ids = tok(), batch['decoder_input_ids']
        special = (ids == t.cls_token_id) | (ids == t.sep_token_id) | (ids == t.pad_token_id)
        return (batch['decoder_attention_mask'].bool() & ~special).sum(1).double()
    return (batch['labels'] != IGNORE_INDEX).sum(1).double()


@pytest.mark.parametrize('objective,name,cfg,ckw', OBJECTIVES, ids=IDS)
def test_padding_is_never_content_end_to_end(objective, name, cfg, ckw):
    t = tok()
    # the same sequences, (a) unpadded and collated to the batch max, (b) pre-padded to 160 (upstream's dataset) and
    # collated with a long pad_to_multiple_of: the collator must derive the real tokens from the masks, not the length
    plain = collator_for(objective, t, seed=3, **ckw)(features(LENGTHS))
    padded = collator_for(objective, t, seed=3, pad_to_multiple_of=160, **ckw)(features(LENGTHS, prepad=150))
    nopad_mask = collator_for(objective, t, seed=3, pad_to_multiple_of=160,
                              **ckw)(features(LENGTHS, prepad=150, with_mask=False))
    for k in plain:
        a, p, q = plain[k], padded[k], nopad_mask[k]
        assert torch.equal(p, q), k
        if k == 't': assert torch.equal(a, p); continue
        L = a.shape[1]
        assert p.shape[1] == 160 and torch.equal(p[:, :L], a), k     # identical content, only more padding
        tail = p[:, L:]
        if k == 'labels': assert (tail == IGNORE_INDEX).all()        # padding is never labelled
        elif 'attention_mask' in k: assert (tail == 0).all()         # ... never attended
        else: assert (tail == t.pad_token_id).all()                  # ... never noised ([MASK]) or kept as content
    # padding inside the plain batch (short rows): never labelled, never [MASK], never visible
    am = plain['attention_mask'].bool()
    dm = plain.get('decoder_attention_mask', plain['attention_mask']).bool()
    closed = objective in ('tsdae', 'prefix_diffusion')                # encoder input and labels laid out separately
    assert (plain['labels'][~dm] == IGNORE_INDEX).all()
    if 'decoder_input_ids' in plain: assert (plain['decoder_input_ids'][~dm] == t.pad_token_id).all()
    assert (plain['input_ids'][~am if closed else ~am & ~dm] == t.pad_token_id).all()
    if objective == 'masked_reconstruction':                          # deletions hide real tokens only, in place
        deleted = dm & ~am
        assert deleted.any() and (plain['labels'][dm] == plain['input_ids'][dm]).all()
    if objective == 'tsdae':                                          # the encoder gets fewer tokens than the labels
        assert (am.sum(1) < dm.sum(1)).all() and torch.equal(dm.sum(1), torch.tensor(LENGTHS))

    # the model: losses and concepts do not depend on the padding, and each row alone gives its batch row
    model = model_for(name, **cfg)
    with torch.no_grad():
        o_plain = model(**plain, output_attentions=True)
        o_pad = model(**padded, output_attentions=True)
        torch.testing.assert_close(o_pad.loss, o_plain.loss, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(o_pad.concepts, o_plain.concepts, rtol=1e-5, atol=1e-6)
        for att in o_pad.attentions:                                  # (B, heads, C, N): no weight on hidden positions
            assert (att.masked_select(~padded['attention_mask'].bool()[:, None, None, :].expand_as(att)) == 0).all()
        alone = [model(**_rows_of(plain, b, closed=objective == 'tsdae')) for b in range(len(LENGTHS))]
        torch.testing.assert_close(torch.cat([o.concepts for o in alone]), o_plain.concepts, rtol=1e-5, atol=1e-6)
        w = _n_loss_terms(plain, objective)
        combined = sum(float(o.loss) * float(n) for o, n in zip(alone, w)) / float(w.sum())
        assert math.isclose(combined, float(o_plain.loss), rel_tol=1e-5), (combined, float(o_plain.loss))


def test_tsdae_model_encodes_the_closed_up_survivors():
    """issue 14, defect 4: the `tsdae` encoder must see only the surviving tokens at consecutive positions 0..n-1
    (before, deleted tokens kept their positions and the survivors sat at their original ones, so the encoder knew
    where the gaps were), and the model must rebuild the whole original text: its loss is the dense CE over every real
    token of the original documents, decoded at positions 0..N-1 from the concepts."""
    t = tok()
    batch = collator_for('tsdae', t, seed=4)(features(LENGTHS))
    model = model_for('tsdae_posonly')
    am = batch['attention_mask'].bool()
    surv = [batch['input_ids'][b][am[b]] for b in range(len(LENGTHS))]   # what the encoder attends to, in order
    ids = torch.full((len(surv), max(len(s) for s in surv)), t.pad_token_id)
    mask = torch.zeros_like(ids)
    for b, s in enumerate(surv): ids[b, :len(s)], mask[b, :len(s)] = s, 1
    orig = torch.full((len(LENGTHS), max(LENGTHS)), IGNORE_INDEX)
    for b, f in enumerate(features(LENGTHS)): orig[b, :len(f['input_ids'])] = torch.tensor(f['input_ids'])
    assert all(len(s) < n for s, n in zip(surv, LENGTHS))
    with torch.no_grad():
        out = model(**batch)
        torch.testing.assert_close(out.concepts, model.encoder(ids, mask).last_hidden_state, rtol=1e-5, atol=1e-5)
        assert torch.equal(batch['labels'], orig)                                  # the original text, dense
        h = model.decode(out.concepts, torch.zeros_like(orig))                     # (B, N, H) at positions 0..N-1
        ce = torch.nn.functional.cross_entropy(model.lm_head(h).flatten(0, 1), orig.flatten(),
                                               ignore_index=IGNORE_INDEX)
        assert torch.isfinite(out.loss) and math.isclose(float(out.loss), float(ce), rel_tol=1e-5)
        assert out.logits.shape[:2] == orig.shape


def _ce(logits_row, y):
    "Cross-entropy of one row of logits (a list of floats), computed by hand."
    m = max(logits_row)
    return -(logits_row[y] - m - math.log(sum(math.exp(v - m) for v in logits_row)))

class FixedHead(nn.Module):
    "An LM head that returns given logits for the labelled rows (so the CE values are known)."
    def __init__(self, logits): super().__init__(); self.logits = logits
    def forward(self, h): return self.logits[:h.shape[0]] + 0 * h.sum()


@pytest.mark.parametrize('smoothing', [0.0, 0.1])
def test_mdlm_estimator_equals_its_formula(smoothing):
    V, mid = len(tok()), tok().mask_token_id
    model = model_for('diffusion_mlm', label_smoothing=smoothing)
    # two samples, 4 positions; sample 1 has one padding position. Noised: (0,1), (0,3) at t=0.5 and (1,2) at t=0.25
    ids = torch.tensor([[101, 102, 103, 104], [105, 106, 107, 0]])
    am = torch.tensor([[1, 1, 1, 1], [1, 1, 1, 0]])
    labels = torch.full_like(ids, -100)
    labels[0, 1], labels[0, 3], labels[1, 2] = 102, 104, 107
    dec = ids.masked_fill(labels != -100, mid)
    t = torch.tensor([0.5, 0.25])
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(3, V, generator=g) * 3
    logits[0, 102] += 4.0; logits[2, 107] -= 2.0                        # some confident, some wrong predictions
    model.lm_head = FixedHead(logits)
    ce = [_ce(logits[i].tolist(), y) for i, y in enumerate([102, 104, 107])]
    n_real = 7                                                         # maskable decoder tokens: padding is not counted
    nelbo = (ce[0] / 0.5 + ce[1] / 0.5 + ce[2] / 0.25) / n_real       # MDLM / LLaDA: sum of CE / t over B*L real tokens
    batch = dict(input_ids=ids, attention_mask=am, decoder_input_ids=dec, decoder_attention_mask=am, labels=labels, t=t)
    for weighting in ('mdlm', 'self_normalized', 'none'):
        model.config.elbo_weighting = weighting
        out = model(**batch)
        # the reported bound is always MDLM, unsmoothed
        assert math.isclose(float(out.recon_nelbo), nelbo, rel_tol=1e-5), weighting
        if smoothing == 0:
            want = dict(mdlm=nelbo, self_normalized=(2 * ce[0] + 2 * ce[1] + 4 * ce[2]) / 8,
                        none=sum(ce) / 3)[weighting]
            assert math.isclose(out.loss.item(), want, rel_tol=1e-5), weighting
        else:                                                   # the training loss is the same estimator of smoothed CE
            sce = torch.nn.functional.cross_entropy(logits, torch.tensor([102, 104, 107]), reduction='none',
                                                    label_smoothing=smoothing)
            assert torch.allclose(out.loss, diffusion_loss(sce, torch.tensor([0.5, 0.5, 0.25]), n_real, weighting))
            if weighting == 'mdlm': assert out.loss.item() != pytest.approx(nelbo)
    # diffusion_loss itself on the hand-computed case, and the empty case
    d = diffusion_loss(torch.tensor(ce), torch.tensor([0.5, 0.5, 0.25]), n_real, 'mdlm')
    assert math.isclose(float(d), nelbo, rel_tol=1e-6)
    assert float(diffusion_loss(torch.zeros(0), torch.zeros(0), 5, 'mdlm')) == 0.0


def _spy_encoder(model):
    "Record the (input_ids, attention_mask) the encoder is called with."
    calls, fwd = [], model.encoder.forward
    def spy(input_ids, attention_mask=None, **kw):
        calls.append((input_ids.clone(), None if attention_mask is None else attention_mask.clone()))
        return fwd(input_ids, attention_mask, **kw)
    model.encoder.forward = spy
    return calls

@pytest.mark.parametrize('temperature,top_k,steps', [(1.0, 0, 4), (0.0, 0, 1), (0.7, 5, 50)])
def test_generate_infills_every_mask_and_keeps_context(temperature, top_k, steps):
    t = tok()
    mid, pad = t.mask_token_id, t.pad_token_id
    model = model_for('diffusion_mlm')
    b = collator_for('diffusion', t, seed=1, t_min=0.5)(features([40, 17]))
    x, dm = b['decoder_input_ids'], b['decoder_attention_mask']
    calls = _spy_encoder(model)
    out = model.generate(x, dm, input_ids=b['input_ids'], attention_mask=b['attention_mask'], num_steps=steps,
                         temperature=temperature, top_k=top_k, generator=torch.Generator().manual_seed(0))
    todo = (x == mid) & dm.bool()
    assert todo.sum() > 5
    assert not ((out == mid) & dm.bool()).any()                         # every mask is filled ...
    assert torch.equal(out[~todo], x[~todo])                           # ... and nothing else changes (context, padding)
    assert (out[~dm.bool()] == pad).all()
    # the encoder ran once, on the clean text (the diffusion objective's concepts; it never sees [MASK])
    assert len(calls) == 1
    ids, am = calls[0]
    assert (torch.equal(ids, b['input_ids']) and torch.equal(am, b['attention_mask'])
            and not (ids[am.bool()] == mid).any())

def test_generate_from_a_prefix_fills_the_suffix():
    t = tok()
    mid, pad = t.mask_token_id, t.pad_token_id
    model = model_for('diffusion_mlm')
    b = collator_for('prefix_diffusion', t, seed=2)(features([60, 30]))
    dm = b['decoder_attention_mask']
    x = torch.where(dm.bool(), torch.full_like(dm, mid), torch.full_like(dm, pad))     # the whole suffix to generate
    calls = _spy_encoder(model)
    out = model.generate(x, dm, input_ids=b['input_ids'], attention_mask=b['attention_mask'], num_steps=6,
                         temperature=0.0)
    assert not (out[dm.bool()] == mid).any() and (out[~dm.bool()] == pad).all()
    assert (len(calls) == 1 and torch.equal(calls[0][0], b['input_ids'])
            and torch.equal(calls[0][1], b['attention_mask']))
    # a partly known suffix (infilling after a prefix): known suffix tokens stay as they are
    y = b['decoder_input_ids']
    out2 = model.generate(y, dm, input_ids=b['input_ids'], attention_mask=b['attention_mask'], num_steps=3,
                          temperature=1.0,
                          generator=torch.Generator().manual_seed(1))
    keep = ~((y == mid) & dm.bool())
    assert torch.equal(out2[keep], y[keep]) and not (out2[dm.bool()] == mid).any()


def test_prefix_labels_only_on_the_suffix():
    t = tok()
    lengths = [90, 61, 33]
    feats = features(lengths)
    b = collator_for('prefix_diffusion', t, seed=5, t_min=0.3)(feats)
    for i, f in enumerate(feats):
        x = torch.tensor(f['input_ids'])
        k, s = int(b['attention_mask'][i].sum()), int(b['decoder_attention_mask'][i].sum())
        assert k + s == len(x) and 0.3 * len(x) - 1 <= k <= 0.5 * len(x) + 1
        assert torch.equal(b['input_ids'][i, :k], x[:k])                  # the encoder sees the clean prefix
        suffix, dec, lab = x[k:], b['decoder_input_ids'][i, :s], b['labels'][i, :s]
        hit = lab != IGNORE_INDEX
        assert hit.any() and torch.equal(lab[hit], suffix[hit])           # labels: the original suffix tokens ...
        # ... at its noised positions
        assert (dec[hit] == t.mask_token_id).all() and torch.equal(dec[~hit], suffix[~hit])
        assert (b['labels'][i, s:] == IGNORE_INDEX).all()                # decoder position 0 = the suffix start

def test_prefix_loss_ignores_the_prefix():
    ("With the concepts held fixed, the prefix (its tokens, its length) cannot change the loss: "
     "it reads only the suffix.")
    t = tok()
    model = model_for('diffusion_mlm')
    b = collator_for('prefix_diffusion', t, seed=5)(features([90, 61, 33]))
    with torch.no_grad():
        ref = model(**b)
        fixed = ref.concepts
        enc = model.encoder.forward
        model.encoder.forward = lambda *a, **k: type('E', (), dict(last_hidden_state=fixed, hidden_states=None,
                                                                   attentions=None))()
        other = dict(b, input_ids=torch.randint(5, len(t), (3, 7)), attention_mask=torch.ones(3, 7, dtype=torch.long))
        assert torch.equal(model(**other).loss, ref.loss)                   # a different (shorter) prefix: same loss
        model.encoder.forward = enc
        assert not torch.equal(model(**other).loss, ref.loss)               # with the real encoder the prefix matters
    # the normaliser counts maskable suffix tokens only (prefix tokens and the suffix's [SEP] are never noised)
    with torch.no_grad():
        rows = b['labels'].flatten() != IGNORE_INDEX
        h = model.decoder(ref.concepts, b['decoder_input_ids'], b['t'])
        ce = torch.nn.functional.cross_entropy(model.lm_head(h.flatten(0, 1)[rows]).float(),
                                               b['labels'].flatten()[rows],
                                               reduction='none')
        t_rows = b['t'][:, None].expand_as(b['labels']).flatten()[rows]
        dec = b['decoder_input_ids']
        n = (b['decoder_attention_mask'].bool() & (dec != t.sep_token_id) & (dec != t.cls_token_id)).sum()
        want = (ce / t_rows).sum() / n
        assert torch.allclose(ref.recon_nelbo, want, rtol=1e-5)


SMALL_RUN = dict(hidden_size=32, concept_num=4, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64,
                 block_size=32, batch_size=4, max_docs=30, eval_max_docs=8, steps=3, log_every=1, eval_every=0,
                 eval_batches=1, save_every=0, lr=3e-3, warmup_steps=1, concept_losses='none', wandb_mode='disabled',
                 device='cpu', seed=3)

def test_tsdae_warm_start_loads_the_mlm_encoder_exactly(tmp_path):
    m = run_pretraining({**SMALL_RUN, 'model_type': 'perceiver_posonly_mlm', 'run_dir': str(tmp_path / 'mlm')},
                        log=lambda *a: None)
    assert m['status'] == 'completed'
    src = read_state_dict(tmp_path / 'mlm' / 'model')
    enc = {k: v for k, v in src.items() if k.startswith('encoder.')}
    assert enc and torch.equal(enc['encoder.token_embeddings.weight'],
                               load_model(tmp_path / 'mlm' / 'model').encoder.token_embeddings.weight)
    P = resolve_params({**SMALL_RUN, 'model_type': 'tsdae_posonly', 'objective': 'tsdae',
                        'run_dir': str(tmp_path / 'tsdae'),
                        'init_from': str(tmp_path / 'mlm')}, log=lambda *a: None)
    lines = []
    model, *_ = build_pretraining(P, log=lines.append)
    own = model.state_dict()
    assert (all(torch.equal(own[k], v) for k, v in enc.items())
            and {k for k in own if k.startswith('encoder.')} == set(enc))
    assert torch.equal(model.lm_head.weight, enc['encoder.token_embeddings.weight'])        # tied head follows
    r = model.init_report
    assert (r['loaded'] == len(enc) and r['source'] == str(tmp_path / 'mlm' / 'model')
            and r['tied'] == ['lm_head.weight'])
    assert any(l.startswith(f"init_from {tmp_path / 'mlm' / 'model'}: loaded {len(enc)} encoder tensors")
               for l in lines)
    # the random decoder is not touched: it equals a fresh build with the same seed
    fresh, *_ = build_pretraining({**P, 'init_from': ''}, log=lambda *a: None)
    assert all(torch.equal(v, fresh.state_dict()[k]) for k, v in own.items() if k.startswith('decoder.'))
    # through a whole run: recorded in params.json, and training starts from the MLM encoder
    m2 = run_pretraining({**P, 'run_dir': str(tmp_path / 'tsdae_run')}, log=lambda *a: None)
    rec = json.loads((tmp_path / 'tsdae_run' / 'params.json').read_text())
    assert m2['status'] == 'completed' and rec['params']['init_from'] == str(tmp_path / 'mlm')
    assert rec['init_from']['loaded'] == len(enc)
    # a checkpoint (or a record .ipynb path) works as the source too; a mismatched encoder fails naming the file
    model2, *_ = build_pretraining({**P, 'init_from': str(tmp_path / 'tsdae_run' / 'checkpoints' / 'step-3')},
                                   log=lambda *a: None)
    with pytest.raises(ValueError, match=r"mlm/model/model\.safetensors: its encoder\.\* weights do not fit"):
        build_pretraining({**P, 'use_bixt': True}, log=lambda *a: None)
    with pytest.raises(ValueError, match='shape'):
        build_pretraining(resolve_params({**P, 'hidden_size': 64}, log=lambda *a: None), log=lambda *a: None)
    with pytest.raises(ParamError, match='does not exist'):
        check_params({**P, 'init_from': str(tmp_path / 'nope')}, PRETRAIN_TYPES, PRETRAIN_RULES)
    with pytest.raises(FileNotFoundError, match='holds no saved model'):
        init_encoder_from(model2, tmp_path)
