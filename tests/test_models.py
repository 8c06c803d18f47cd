"""Issue 2 invariants as a table: every registry model trains, ignores padding and round-trips bit for bit."""
import json, pytest, torch
from concept_nb.config import ConceptEncoderConfig
from concept_nb.encoder import padding_invariance_error
from concept_nb.heads import (MODEL_REGISTRY, CLASSIFIER_REGISTRY, build_model, load_model, classifier_from_pretrained,
                              ConceptEncoderForSequenceClassification)

def tiny(**kw):
    base = dict(vocab_size=60, concept_num=4, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                intermediate_size=32, max_sequence_length=40, pad_token_id=0, mask_token_id=1, cls_token_id=2,
                sep_token_id=3, hidden_dropout_prob=0., attention_probs_dropout_prob=0.)
    return ConceptEncoderConfig(**{**base, **kw})

def batch(seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(4, 60, (3, 14), generator=g)
    mask = torch.ones_like(ids); mask[1, 9:] = 0; mask[2, 4:] = 0
    ids[mask == 0] = 0
    labels = torch.full_like(ids, -100); labels[:, 1:3] = ids[:, 1:3]
    return ids, mask, labels

VARIANTS = dict(standard={}, bixt=dict(use_bixt=True), recursive=dict(num_iterations=3),
                inversion=dict(token_embedding_dim=8), sinusoidal=dict(concept_position_type='sinusoidal'))

# the concept models (the Transformer MDLM baseline has no concept encoder: tests/test_diffusion_lm.py covers it)
CONCEPT_MODELS = [n for n in MODEL_REGISTRY if n != 'mdlm_transformer']

@pytest.mark.parametrize('name', CONCEPT_MODELS)
@pytest.mark.parametrize('variant', list(VARIANTS))
def test_registry_model_trains_and_ignores_padding(name, variant):
    torch.manual_seed(0)
    m = build_model(name, tiny(**VARIANTS[variant]))
    ids, mask, labels = batch()
    step = lambda: m(ids, mask, t=torch.full((3,), .6)) if name == 'diffusion_mlm' else m(ids, mask, labels=labels)
    out = step()
    assert torch.isfinite(out.loss)
    out.loss.backward()
    if name == 'diffusion_mlm':   # AdaLN-Zero gates start at 0: the encoder gets gradient from the second step on
        torch.optim.SGD(m.parameters(), lr=0.1).step(); m.zero_grad(); step().loss.backward()
    grads = [p.grad for p in m.encoder.parameters() if p.requires_grad]
    assert sum(g.abs().sum().item() for g in grads if g is not None) > 0
    m.eval()
    err = padding_invariance_error(m.encoder, ids, mask, extra=11)
    assert err < 1e-5, f'{name}/{variant}: concepts change by {err} with extra padding'

@pytest.mark.parametrize('head', list(CLASSIFIER_REGISTRY))
@pytest.mark.parametrize('variant', ['standard', 'bixt', 'recursive'])
def test_classifier_heads_ignore_padding(head, variant):
    m = ConceptEncoderForSequenceClassification(tiny(classifier_head=head, num_labels=3, **VARIANTS[variant])).eval()
    ids, mask, _ = batch(1)
    kw = (lambda i, a: dict(input_ids_b=i, attention_mask_b=a)) if head == 'pair' else (lambda i, a: {})
    fn = lambda mm, i, a: mm(i, a, **kw(i, a)).logits
    assert padding_invariance_error(m, ids, mask, 9, fn) < 1e-5

@pytest.mark.parametrize('name', list(MODEL_REGISTRY))
def test_round_trip_is_bit_exact(name, tmp_path):
    m = build_model(name, tiny(use_bixt=True)).eval()
    m.save_pretrained(tmp_path)
    m2 = load_model(tmp_path)
    assert type(m2) is type(m)
    sd, sd2 = m.state_dict(), m2.state_dict()
    assert sd.keys() == sd2.keys()
    for k in sd: assert torch.equal(sd[k], sd2[k]), k

@pytest.mark.parametrize('field,value,needle', [
    ('hidden_size', 30, 'hidden_size'), ('concept_num', 0, 'concept_num'),
    ('concept_position_type', 'rope', 'concept_position_type'),
    ('num_attention_heads', 0, 'num_attention_heads'), ('decoder_type', 'gpt', 'decoder_type'),
    ('num_iterations', -2, 'num_iterations'),
    ('classifier_head', 'mean', 'classifier_head'), ('t_min', 0., 't_min'),
    ('elbo_weighting', 'elbo', 'elbo_weighting'),
    ('token_embedding_dim', 0, 'token_embedding_dim'),
    ('attention_probs_dropout_prob', 1.0, 'attention_probs_dropout_prob')])
def test_bad_config_names_the_field(field, value, needle):
    with pytest.raises(ValueError, match=needle): ConceptEncoderConfig(**{field: value})

def test_unknown_model_type_suggests():
    with pytest.raises(ValueError, match="did you mean 'weighted_mlm'"): build_model('weighted_mlmm')

def test_via_decoder_loads_encoder_and_decoder(tmp_path):
    src = build_model('perceiver_mlm', tiny()); src.save_pretrained(tmp_path)
    clf, rep = classifier_from_pretrained(tmp_path, 'via_decoder', num_labels=1)
    assert clf.config.problem_type == 'regression'
    for k, v in src.state_dict().items():
        if k.startswith(('encoder.', 'decoder.')): assert torch.equal(clf.state_dict()[k], v), k
    assert set(rep['new']) == {k for k in clf.state_dict() if k.startswith(('classifier.', 'pre_pool_norm.'))}

def test_recursive_depth_changes_at_inference():
    m = build_model('recursive_mlm', tiny()).eval()
    ids, mask, _ = batch()
    a = m.encoder(ids, mask).last_hidden_state
    m.config.num_iterations = 5
    out = m.encoder(ids, mask, output_hidden_states=True)
    assert len(out.hidden_states) == 6 and not torch.allclose(a, out.last_hidden_state)

# ---------------------------------------------------------------- issue 14: the heads compute what their names say
import math
from concept_nb.heads import noise_tokens

MLM_MODELS = ('weighted_mlm', 'perceiver_mlm', 'perceiver_posonly_mlm', 'recursive_mlm')

def ragged_labels(ids, mask, seed=0, rate=0.35):
    "Labels at different random positions in every row (at least one per row), real tokens only."
    g = torch.Generator().manual_seed(seed)
    hit = (torch.rand(ids.shape, generator=g) < rate) & mask.bool()
    hit[torch.arange(len(ids)), (torch.rand(len(ids), generator=g) * mask.sum(1)).long()] = True
    return ids.masked_fill(~hit, -100)

@pytest.mark.parametrize('name', MLM_MODELS)
def test_sparse_decoding_equals_dense_with_ragged_labels(name):
    """issue 14, defect 1: decoding only the labelled rows gives the loss and gradients of decoding every row, also when
    each row has its labels at other positions (the weighted decoder's '...nc,bch' einsum mixed samples there)."""
    torch.manual_seed(0)
    m = build_model(name, tiny(use_bixt=name == 'recursive_mlm')).eval()
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(4, 60, (4, 14), generator=g)
    mask = torch.ones_like(ids); mask[1, 10:] = 0; mask[3, 5:] = 0; ids[mask == 0] = 0
    labels = ragged_labels(ids, mask)
    assert len({tuple(r.ne(-100).nonzero().flatten().tolist()) for r in labels}) == 4    # no two rows alike
    res = {}
    for mode in ('sparse', 'dense'):
        m.config.decoder_loss = mode; m.zero_grad()
        out = m(ids, mask, labels=labels); out.loss.backward()
        res[mode] = out.loss.detach(), {k: p.grad.clone() for k, p in m.named_parameters() if p.grad is not None}
    assert abs(res['sparse'][0].item() - res['dense'][0].item()) < 1e-5, (res['sparse'][0], res['dense'][0])
    assert res['sparse'][1].keys() == res['dense'][1].keys()
    for k, gs in res['sparse'][1].items():
        torch.testing.assert_close(gs, res['dense'][1][k], atol=1e-5, rtol=1e-4, msg=k)

def test_diffusion_sparse_estimator_equals_full_logits():
    """issue 14, defect 1 (diffusion): the sparse estimator (noised rows only) equals the same estimator computed
    from the full (B, N, V) logits, with noised positions that differ in every row."""
    torch.manual_seed(0)
    m = build_model('diffusion_mlm', tiny(label_smoothing=0.)).eval()
    for blk in m.decoder.blocks: torch.nn.init.normal_(blk.ada.weight, std=0.2)   # a decoder that reads the concepts
    ids, mask, _ = batch(3)
    t = torch.tensor([0.9, 0.5, 0.7])
    noisy, labels = noise_tokens(ids, mask, 1, t, (2, 3, 0), generator=torch.Generator().manual_seed(2))
    out = m(ids, mask, decoder_input_ids=noisy, decoder_attention_mask=mask, labels=labels, t=t)
    with torch.no_grad():
        full = m.lm_head(m.decoder(m.encoder(ids, mask).last_hidden_state, noisy, t))       # (B, N, V)
        rows = labels != -100
        ce = torch.nn.functional.cross_entropy(full[rows], labels[rows], reduction='none')
        n = (mask.bool() & (ids != 2) & (ids != 3)).sum()
        want = (ce / t[:, None].expand_as(labels)[rows]).sum() / n
    torch.testing.assert_close(out.masked_logits, full[rows], atol=1e-5, rtol=1e-5)
    assert abs(out.loss.item() - want.item()) < 1e-5

def via_features(m, ids, mask, concepts):
    "Pooled features of `ids` when the encoder is forced to return `concepts`."
    enc = m.encoder.forward
    m.encoder.forward = lambda *a, **k: type('E', (), dict(last_hidden_state=concepts))()
    try: return m.features(ids, mask)[0]
    finally: m.encoder.forward = enc

def test_via_decoder_reads_only_the_concepts():
    """issue 14, defect 3: with position queries (the default for via_decoder on a Perceiver decoder) two inputs with
    identical concepts pool to identical features; the 'token' option keeps the token shortcut, which does not."""
    ids, mask, _ = batch(4)
    ids2 = torch.randint(4, 60, ids.shape, generator=torch.Generator().manual_seed(9)); ids2[mask == 0] = 0
    c = torch.randn(3, 4, 16, generator=torch.Generator().manual_seed(5))
    gap = {}
    for q in ('default', 'position', 'token'):
        kw = {} if q == 'default' else dict(via_decoder_queries=q)
        torch.manual_seed(0)
        cfg = tiny(classifier_head='via_decoder', decoder_type='perceiver', **kw)
        m = ConceptEncoderForSequenceClassification(cfg).eval()
        with torch.no_grad(): gap[q] = (via_features(m, ids, mask, c) - via_features(m, ids2, mask, c)).abs().max()
    gap = {k: v.item() for k, v in gap.items()}
    assert gap['default'] < 1e-6 and gap['position'] < 1e-6, gap
    assert gap['token'] > 1e-3, gap

@pytest.mark.parametrize('head', ['weighted_pool', 'via_decoder'])
def test_zero_concepts_control_ignores_the_concepts(head):
    """issue 14, defect 3: with zero_concepts=True the head sees zeros, so its features are the same for any concepts
    (for via_decoder with token queries they still depend on the tokens: the control for the shortcut)."""
    ids, mask, _ = batch(4)
    c1, c2 = torch.randn(2, 3, 4, 16, generator=torch.Generator().manual_seed(6))
    torch.manual_seed(0)
    cfg = tiny(classifier_head=head, decoder_type='perceiver', via_decoder_queries='token', zero_concepts=True)
    m = ConceptEncoderForSequenceClassification(cfg).eval()
    with torch.no_grad():
        assert (via_features(m, ids, mask, c1) - via_features(m, ids, mask, c2)).abs().max().item() < 1e-6
        m.config.zero_concepts = False
        assert (via_features(m, ids, mask, c1) - via_features(m, ids, mask, c2)).abs().max().item() > 1e-3

def test_diffusion_estimator_is_unbiased_on_short_sequences():
    """issue 14, defect 5a: the MDLM estimator divides by maskable tokens ([CLS]/[SEP] are never noised). With a
    constant per-token CE (a zero LM head: CE = log V everywhere) its expectation must be log V; Monte Carlo over 4,000
    rows of '[CLS] a b [SEP] [PAD] [PAD]' (2 maskable tokens, t ~ U(0.3, 1)), tolerance 4 standard errors."""
    torch.manual_seed(0)
    V, B = 60, 4000
    m = build_model('diffusion_mlm', tiny(label_smoothing=0., t_min=0.3)).eval()
    torch.nn.init.zeros_(m.lm_head.weight)
    g = torch.Generator().manual_seed(0)
    ids = torch.tensor([[2, 10, 11, 3, 0, 0]]).repeat(B, 1); ids[:, 1:3] = torch.randint(4, V, (B, 2), generator=g)
    mask = (ids != 0).long()
    t = 0.3 + 0.7 * torch.rand(B, generator=g)
    noisy, labels = noise_tokens(ids, mask, 1, t, (2, 3, 0), generator=g)
    with torch.no_grad(): out = m(ids, mask, decoder_input_ids=noisy, decoder_attention_mask=mask, labels=labels, t=t)
    per_row = (labels != -100).sum(1) / t / 2 * math.log(V)               # each row's own estimate
    se = per_row.std().item() / math.sqrt(B)
    assert abs(out.loss.item() - math.log(V)) < 4 * se, (out.loss.item(), math.log(V), se)
    assert abs(out.recon_nelbo.item() - out.loss.item()) < 1e-5          # the reported bound is the same estimator

def test_recon_nelbo_is_recorded_under_its_name_with_its_t_range(tmp_path):
    """issue 14, defect 5c: the diffusion bound is recorded as recon_nelbo (train/eval history, metrics.json) with the t
    range it averages over, and old records that say nelbo / eval_nelbo still load under the new names."""
    from concept_nb.records import History
    from concept_nb.train import run_metrics
    from concept_nb.registry import read_run
    h = History([dict(step=1, kind='train', loss=2., task_loss=2., tokens=10, train_s=1., nelbo=3.),
                 dict(step=1, kind='eval', eval_loss=2.5, eval_nelbo=3.5)])       # records written before the rename
    h.step = 1
    m = run_metrics(h, dict(t_min=0.3, objective='diffusion'))
    r = m['results']
    got = r.get('train_recon_nelbo_end'), r.get('eval_recon_nelbo'), r.get('recon_nelbo_t_range')
    assert got == (3., 3.5, [0.3, 1.0])
    d = tmp_path / '2026-11-21_old-diffusion'; d.mkdir()
    (d / 'metrics.json').write_text(json.dumps(dict(status='completed', eval_nelbo=7.1, train_nelbo_end=7.0)))
    got = read_run(d)['metrics']['results']
    assert (got.get('eval_recon_nelbo'), got.get('train_recon_nelbo_end')) == (7.1, 7.0)

def diffusion_model(**kw):
    "A small diffusion model whose AdaLN-Zero gates are randomised (at init the denoiser ignores the concepts)."
    torch.manual_seed(0)
    m = build_model('diffusion_mlm', tiny(**kw)).eval()
    for blk in m.decoder.blocks: torch.nn.init.normal_(blk.ada.weight, std=0.2)
    return m

def spy_decoder(m):
    "Record (concepts, decoder input, t) of every decoder call."
    calls, fwd = [], m.decoder.forward
    def spy(c, x, t, positions=None):
        calls.append((c.clone(), x.clone(), t.clone())); return fwd(c, x, t, positions)
    m.decoder.forward = spy
    return calls

def test_generate_refuses_what_it_cannot_condition_on():
    """issue 14, defect 6: an all-[MASK] input (BiXT) used to give NaN concepts and [PAD] everywhere without a word.
    Without input_ids a diffusion model (concepts of the clean text) refuses; a row with no visible encoder token
    fails."""
    m = diffusion_model(use_bixt=True, objective='diffusion')
    x = torch.full((2, 8), 1)                                                    # all [MASK]
    with pytest.raises(ValueError, match='clean text'): m.generate(x, num_steps=2, temperature=0.)   # was: all [PAD]
    with pytest.raises(ValueError, match='no visible encoder token'):
        m.generate(x, input_ids=x, num_steps=2, temperature=0.)
    ids = torch.randint(4, 60, (2, 8)); am = torch.ones_like(ids); am[1] = 0
    with pytest.raises(ValueError, match=r'rows \[1\]'):
        m.generate(x, input_ids=ids, attention_mask=am, num_steps=2, temperature=0.)

def test_generate_continues_a_prefix_as_training_encodes_it():
    """issue 14, defect 6: for prefix_diffusion the encoder sees the clean prefix as PrefixDiffusionCollator feeds it
    ('[CLS] text', no closing [SEP], which a tokenizer appends), and the t fed at each step is the real share of the
    row's maskable positions still masked (not the nominal 1 - s/S: 7 masks in 3 steps leave 4/7, not 2/3)."""
    m = diffusion_model(objective='prefix_diffusion')
    body = torch.randint(4, 60, (2, 6), generator=torch.Generator().manual_seed(0))
    prefix = torch.cat([torch.full((2, 1), 2), body, torch.zeros(2, 1, dtype=torch.long)], 1)   # training: [CLS] text
    am = torch.ones_like(prefix); am[0, 7:] = 0; am[1, 4:] = 0; prefix[am == 0] = 0
    tok_in = prefix.clone(); tok_in[0, 7], tok_in[1, 4] = 3, 3                # as tokenised: [CLS] text [SEP]
    am_in = am.clone(); am_in[0, 7], am_in[1, 4] = 1, 1
    x = torch.full((2, 8), 1); x[0, 7], x[1, 4] = 3, 3; x[1, 5:] = 0             # suffix: 7 and 4 masks, then [SEP]
    dm = (x != 0).long()
    calls = spy_decoder(m)
    out = m.generate(x, dm, input_ids=tok_in, attention_mask=am_in, num_steps=3, temperature=0.)
    with torch.no_grad(): want = m.encoder(prefix, am).last_hidden_state
    assert len(calls) == 3 and not ((out == 1) & dm.bool()).any()
    for c, xs, t in calls:
        assert (c - want).abs().max().item() < 1e-5
        still = ((xs == 1) & dm.bool()).sum(1).float()
        assert torch.allclose(t, still / torch.tensor([7., 4.])), (t, still)
    assert torch.allclose(calls[1][2], torch.tensor([4 / 7, 2 / 4]))
