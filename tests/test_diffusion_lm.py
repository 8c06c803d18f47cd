"Issue 19: the concept-conditioned masked-diffusion LM (04_diffusion_lm): bounds, conditioning, sampler, runs."
import math, tempfile
import pytest, torch, torch.nn as nn
from concept_nb.config import ConceptEncoderConfig
from concept_nb.heads import ConceptEncoderForMaskedDiffusion, build_model, maskable_tokens
from concept_nb.diffusion_lm import (BOUND_NAMES, ConceptDiffusionLM, MaskedDiffusionLMMixin, MDLMTransformer,
                                     committed_token_effect, generate, heldout_bound, mask_tokens, prefix_mask,
                                     sample_t)

torch.set_num_threads(1)
MASK = 1


def cfg(**kw):
    base = dict(vocab_size=40, concept_num=4, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                intermediate_size=32, max_sequence_length=32, pad_token_id=0, mask_token_id=MASK, cls_token_id=2,
                sep_token_id=3, hidden_dropout_prob=0., attention_probs_dropout_prob=0., decoder_layers=2)
    return ConceptEncoderConfig(**{**base, **kw})


# rows of different lengths (padding), labels at different positions per row
IDS = torch.tensor([[2, 5, 6, 7, 8, 9, 3], [2, 10, 11, 3, 0, 0, 0], [2, 12, 13, 14, 15, 3, 0]])
AM = (IDS != 0).long()


class KnownLogits(MaskedDiffusionLMMixin, nn.Module):
    "A 'denoiser' whose logits at position i are a fixed table row: the NELBO can be computed by hand."
    def __init__(self, table):
        super().__init__()
        self.config = cfg(diffusion_mode='lm')
        self.table, self.lm_head = table, nn.Identity()
    def hidden(self, x_t, attention_mask, clean=None, prefix=None, concepts=None):
        return self.table[:x_t.shape[1]].expand(x_t.shape[0], -1, -1), None


def test_nelbo_matches_a_hand_computation():
    "1/t weight, masked rows only, divided by ALL maskable tokens (fully masked row, row with nothing masked, padding)."
    torch.manual_seed(0)
    table = torch.randn(7, 40)
    m = KnownLogits(table)
    t = torch.tensor([1.0, 1e-12, 0.5])                       # row 0 fully masked, row 1 nothing, row 2 about half
    g = lambda: torch.Generator().manual_seed(5)
    out = m(IDS, AM, t=t, generator=g())
    can = maskable_tokens(IDS, AM, (2, 3, 0))
    _, hit = mask_tokens(IDS, can, t, MASK, g())              # replay the forward's draws
    assert hit[0].equal(can[0]) and not hit[1].any() and 0 < hit[2].sum() < can[2].sum()
    logp = table.log_softmax(-1)
    hand = 0.
    for b in range(3):
        for i in range(7):
            if hit[b, i]: hand += -logp[i, IDS[b, i]].item() / t[b].item()
    hand /= can.sum().item()                                  # 5 + 2 + 4 maskable tokens
    assert can.sum() == 11
    assert out.nelbo.item() == pytest.approx(hand, rel=1e-5)
    assert out.loss.item() == pytest.approx(hand, rel=1e-5)


def test_t_sampler_is_stratified_and_in_range():
    t = sample_t(16, generator=torch.Generator().manual_seed(1))
    assert t.min() >= 1e-3 and t.max() <= 1
    assert sorted(((t - 1e-3) / (1 - 1e-3) * 16).floor().long().tolist()) == list(range(16))


@pytest.mark.parametrize('mode', ['lm', 'prefix'])
@pytest.mark.parametrize('mixing', ['concepts', 'full'])
def test_a_committed_token_changes_the_other_predictions(mode, mixing):
    torch.manual_seed(0)
    x = torch.tensor([[2, 5, 6, 7, MASK, MASK, 9, MASK, 3], [2, 8, 9, 10, 11, MASK, MASK, MASK, 3]])
    pre = torch.zeros_like(x, dtype=torch.bool); pre[:, :3] = True
    m = ConceptDiffusionLM(cfg(diffusion_mode=mode, token_mixing=mixing)).eval()
    # position 3 is a committed suffix token: it reaches the masks through the denoiser (and the encoder in lm mode)
    assert committed_token_effect(m, x, torch.ones_like(x), 3, 20, prefix=pre if mode == 'prefix' else None) > 1e-4


def test_no_token_mixing_is_exactly_blind_to_committed_tokens():
    "token_mixing='none' (upstream's decoder): with concepts fixed, a committed token changes nothing elsewhere."
    torch.manual_seed(0)
    x = torch.tensor([[2, 5, 6, 7, MASK, MASK, 9, MASK, 3]])
    pre = torch.zeros_like(x, dtype=torch.bool); pre[:, :3] = True
    m = ConceptDiffusionLM(cfg(diffusion_mode='prefix', token_mixing='none')).eval()
    assert committed_token_effect(m, x, torch.ones_like(x), 3, 20, prefix=pre) == 0.
    ae = ConceptDiffusionLM(cfg(diffusion_mode='autoencode', token_mixing='none')).eval()
    c = ae.encoder(x.masked_fill(x == MASK, 7)).last_hidden_state
    assert committed_token_effect(ae, x, torch.ones_like(x), 6, 20, concepts=c) == 0.
    # ... and the old model (02_heads) is the same: the reason this issue exists
    old = ConceptEncoderForMaskedDiffusion(cfg(decoder_type='diffusion')).eval()
    t = torch.tensor([0.5])
    with torch.no_grad():
        a = old.lm_head(old.decoder(c, x, t))
        y = x.clone(); y[0, 6] = 20
        b = old.lm_head(old.decoder(c, y, t))
    assert (a - b).abs()[0, [4, 5, 7]].max() == 0.


@pytest.mark.parametrize('name,mode', [('concept_diffusion_lm', 'lm'), ('concept_diffusion_lm', 'prefix'),
                                       ('concept_diffusion_lm', 'autoencode'), ('mdlm_transformer', 'lm')])
def test_fully_masked_inputs_give_finite_numbers(name, mode):
    m = build_model(name, cfg(), diffusion_mode=mode)
    out = m(IDS, AM, t=torch.ones(3))                          # every maskable token masked
    assert torch.isfinite(out.loss) and getattr(out, BOUND_NAMES[mode]) is not None
    out.loss.backward()
    x = torch.full((2, 9), MASK)
    pre = torch.zeros_like(x, dtype=torch.bool); pre[:, 0] = True
    kw = dict(prefix=pre) if mode == 'prefix' else dict(clean=torch.full((2, 9), 7)) if mode == 'autoencode' else {}
    assert torch.isfinite(m.eval().predict(x, **kw)).all()


def test_generate_uses_and_refusals():
    torch.manual_seed(0)
    x = torch.tensor([[2, 5, MASK, MASK, 9, MASK, 3]])
    lm = ConceptDiffusionLM(cfg(diffusion_mode='lm')).eval()
    y = generate(lm, x, num_steps=2)
    assert (y != MASK).all() and y[x != MASK].equal(x[x != MASK])
    ae = ConceptDiffusionLM(cfg(diffusion_mode='autoencode')).eval()
    with pytest.raises(ValueError, match='only reconstructs from given concepts'): generate(ae, x)
    assert (generate(ae, x, clean=x.masked_fill(x == MASK, 7)) != MASK).all()
    with pytest.raises(ValueError, match='conditions on x itself'): generate(lm, x, clean=x)
    pf = ConceptDiffusionLM(cfg(diffusion_mode='prefix')).eval()
    with pytest.raises(ValueError, match='continues a clean prefix'): generate(pf, x)
    with pytest.raises(ValueError, match="diffusion_mode must be 'lm'"): MDLMTransformer(cfg(diffusion_mode='prefix'))


def test_prefix_is_never_masked_and_keeps_a_suffix():
    pm = prefix_mask(AM, generator=torch.Generator().manual_seed(0))
    assert (pm.sum(1) >= 1).all() and (pm.sum(1) < AM.sum(1)).all() and not (pm & ~AM.bool()).any()
    m = ConceptDiffusionLM(cfg(diffusion_mode='prefix'))
    out = m(IDS, AM, t=torch.ones(3), prefix=pm)
    assert out.n_maskable == (maskable_tokens(IDS, AM, (2, 3, 0)) & ~pm).sum()


def test_heldout_bound_stops_at_its_standard_error():
    torch.manual_seed(0)
    m = ConceptDiffusionLM(cfg())
    batches = [dict(input_ids=IDS, attention_mask=AM)] * 2
    r = heldout_bound(m, batches, max_draws=50, target_se=0.5, estimator='t')   # 1/t weight: ~2 nats sd per draw
    assert r['se'] <= 0.5 and 4 <= r['draws'] < 50 and r['bits_per_token'] == pytest.approx(r['nats'] / math.log(2))
    assert heldout_bound(m, batches, max_draws=5, target_se=0.)['nats'] == heldout_bound(m, batches, max_draws=5,
                                                                                      target_se=0.)['nats']
    assert m.training                                          # restored


def test_masked_count_estimator_is_the_same_bound_with_less_variance():
    "int_0^1 (1/t) Binom(k; n, t) dt = 1/k: E_k[(n/k) sum CE] equals the continuous-time NELBO (no t input)."
    torch.manual_seed(0)
    m = ConceptDiffusionLM(cfg())
    batches = [dict(input_ids=IDS, attention_mask=AM)]
    rk, rt = [heldout_bound(m, batches, max_draws=48, target_se=0., estimator=e) for e in ('k', 't')]
    assert abs(rk['nats'] - rt['nats']) < 4 * math.hypot(rk['se'], rt['se'])
    assert rk['se'] < rt['se'] / 5
    with pytest.raises(ValueError, match="estimator must be"): m(IDS, AM, estimator='x')


def test_prefix_preset_runs_and_records_its_bound_and_samples():
    "A seconds-long run of a new preset through `run_pretraining`: bound (nats, bits) and samples in metrics.json."
    import json
    from concept_nb.pretrain import list_presets
    from concept_nb.train import run_pretraining
    assert {'cpu-diffusion-lm', 'cpu-diffusion-lm-autoencode', 'cpu-diffusion-lm-prefix',
            'cpu-mdlm-transformer'} <= set(list_presets())
    d = tempfile.mkdtemp()
    run_pretraining(dict(preset='cpu-diffusion-lm-prefix', steps=2, eval_every=0, eval_batches=1, eval_batch_size=4,
                         batch_size=4, max_docs=10, eval_max_docs=4, bound_draws=4, run_dir=d, hidden_size=16,
                         intermediate_size=32, concept_num=4, block_size=32, wandb_mode='disabled'),
                    log=lambda *a: None)
    r = json.load(open(f'{d}/metrics.json'))['results']
    assert r['bound_name'] == 'suffix_nelbo' and r['heldout_bound_draws'] == 4 and 'recon_nelbo_t_range' not in r
    assert r['heldout_bound_bits_per_token'] == pytest.approx(r['heldout_bound_nats'] / math.log(2))
    assert [s['kind'] for s in r['samples']] == ['continuation'] * 3
