"""Issue 2 invariants as a table: every registry model trains, ignores padding and round-trips bit for bit."""
import json, pytest, torch
from concept_nb.config import ConceptEncoderConfig
from concept_nb.encoder import ConceptEncoder, padding_invariance_error
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

@pytest.mark.parametrize('name', list(MODEL_REGISTRY))
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
    ('hidden_size', 30, 'hidden_size'), ('concept_num', 0, 'concept_num'), ('concept_position_type', 'rope', 'concept_position_type'),
    ('num_attention_heads', 0, 'num_attention_heads'), ('decoder_type', 'gpt', 'decoder_type'), ('num_iterations', -2, 'num_iterations'),
    ('classifier_head', 'mean', 'classifier_head'), ('t_min', 0., 't_min'), ('elbo_weighting', 'elbo', 'elbo_weighting'),
    ('token_embedding_dim', 0, 'token_embedding_dim'), ('attention_probs_dropout_prob', 1.0, 'attention_probs_dropout_prob')])
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
