"The bert_mlm baseline (issue 16): same batches as a concept run, labelled-row decoding, save -> GLUE load, refusals."
import os
import pytest, torch
import torch.nn.functional as F
from transformers import BertForMaskedLM
from concept_nb.core import ParamError
from concept_nb.baselines import BertMLMBaseline, bert_config
from concept_nb.checkpoints import latest_checkpoint, load_model_weights, resolve_checkpoint
from concept_nb.pretrain import build_pretraining, resolve_params
from concept_nb.train import run_pretraining

torch.set_num_threads(1)
os.environ.setdefault('WANDB_MODE', 'disabled')

TINY = dict(hidden_size=32, concept_num=4, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64,
            block_size=32, batch_size=4, max_docs=30, eval_max_docs=10, steps=4, log_every=2, eval_every=2,
            eval_batches=1, save_every=2, wandb_mode='disabled', device='cpu', seed=11, concept_losses='none')


def _quiet(*a): pass


def test_same_seed_same_batches(tmp_path):
    "perceiver_mlm and bert_mlm runs with one seed read identical batches: same tokens, masked positions and labels."
    loaders = {}
    for mt in ('perceiver_mlm', 'bert_mlm'):
        P = resolve_params({**TINY, 'model_type': mt, 'run_dir': str(tmp_path / mt)}, log=_quiet)
        model, tok, tr, ev, lm = build_pretraining(P, log=_quiet)
        loaders[mt] = (tr, ev, type(model).__name__)
    assert loaders['bert_mlm'][2] == 'BertMLMBaseline' and loaders['perceiver_mlm'][2] == 'ConceptEncoderForMaskedLM'
    for which in (0, 1):                                         # train and held-out streams
        a, b = loaders['perceiver_mlm'][which], loaders['bert_mlm'][which]
        for g in range(3):
            x, y = a.batch(g), b.batch(g)
            assert x.keys() == y.keys()
            for k in x: assert torch.equal(x[k], y[k]), (which, g, k)
    lab = loaders['bert_mlm'][0].batch(0)['labels'] != -100      # (B, N): masked positions differ from row to row
    assert lab.any(1).all() and len({tuple(r.nonzero().flatten().tolist()) for r in lab}) == lab.shape[0]
    other = resolve_params({**TINY, 'model_type': 'bert_mlm', 'seed': 12, 'run_dir': str(tmp_path / 'o')}, log=_quiet)
    _, _, tr2, _, _ = build_pretraining(other, log=_quiet)
    assert not torch.equal(tr2.batch(0)['labels'], loaders['bert_mlm'][0].batch(0)['labels'])   # the seed matters


def test_labelled_rows_equal_full_logits_loss():
    "Ragged labels (different positions and counts per row, one row with none): sparse loss == stock full-logits loss."
    torch.manual_seed(0)
    m = BertMLMBaseline(bert_config(300, 32, 2, 2, 64, 24, pad_token_id=0)).eval()
    ids = torch.randint(5, 300, (4, 24))
    labels = torch.full_like(ids, -100)
    for r, pos in enumerate(([3], [0, 11, 23], [], [5, 6, 7, 8, 20])):
        labels[r, pos] = ids[r, pos]
    mask = torch.ones_like(ids); mask[2, 18:] = 0
    with torch.no_grad():
        out = m(ids, mask, labels=labels)
        full = BertForMaskedLM.forward(m, input_ids=ids, attention_mask=mask).logits          # (B, N, V)
    ref = F.cross_entropy(full.flatten(0, 1), labels.flatten(), ignore_index=-100)
    assert torch.allclose(out.loss, ref, atol=1e-5)
    assert out.masked_logits.shape == (9, 300) and torch.allclose(out.masked_logits, full[labels != -100], atol=1e-4)
    with torch.no_grad(): none = m(ids, mask, labels=torch.full_like(ids, -100)).loss
    assert none == 0                                                  # nothing labelled: 0, not NaN


def test_concept_losses_refused():
    with pytest.raises(ParamError, match="concept losses do not apply"):
        resolve_params({**TINY, 'model_type': 'bert_mlm', 'concept_losses': 'combined'}, log=_quiet)
    with pytest.raises(ParamError, match="cannot learn objective 'diffusion'"):
        resolve_params({**TINY, 'model_type': 'bert_mlm', 'objective': 'diffusion'}, log=_quiet)


def test_bert_mlm_round_trip(tmp_path):
    "Pretrain a few steps -> record (counts, FLOPs) -> checkpoint reload -> GLUE classifier from the model -> forward."
    from concept_nb.glue import build_classifier, resolve_tokenizer
    run = tmp_path / 'bert'
    m = run_pretraining({**TINY, 'model_type': 'bert_mlm', 'run_dir': str(run)}, log=_quiet)
    mdl = m['model']
    assert mdl['model_type'] == 'bert_mlm' and mdl['num_parameters'] > mdl['num_parameters_non_embedding'] > 0
    assert mdl['flops_per_token'] > 0 and m['results']['eval_loss'] < 9.5 and m['results']['effective_rank'] is None
    ck = resolve_checkpoint(str(run))
    assert ck.kind == 'hf' and ck.path == run / 'model'
    fresh = BertMLMBaseline(bert_config(8000, 32, 1, 2, 64, 32, pad_token_id=0))
    load_model_weights(fresh, latest_checkpoint(run))                   # the resume path: strict, same weights
    saved = BertMLMBaseline.from_pretrained(run / 'model')
    a, b = saved.state_dict(), fresh.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    tok = resolve_tokenizer('', ck)
    model, report = build_classifier(ck, 'mrpc', tok, seed=3, max_length=32)
    assert type(model).__name__ == 'BertForSequenceClassification'
    assert torch.equal(model.bert.embeddings.word_embeddings.weight, saved.bert.embeddings.word_embeddings.weight)
    enc = tok(['a short sentence .', 'and another one , longer than the first'], padding=True, return_tensors='pt')
    with torch.no_grad(): out = model(input_ids=enc['input_ids'], attention_mask=enc['attention_mask'])
    assert out.logits.shape == (2, 2) and torch.isfinite(out.logits).all()
    ctl, rep = build_classifier(ck, 'mrpc', tok, seed=3, max_length=32, control='random_init')
    _same_config_fresh_weights(model, ctl, rep)
    with pytest.raises(ValueError, match="exceeds the model's 32 positions"):
        build_classifier(ck, 'mrpc', tok, max_length=64)


def _same_config_fresh_weights(trained, control, report):
    ("The control has the trained classifier's config and parameter names, "
     "and none of its loaded (non-constant) weights.")
    skip = ('_name_or_path', 'transformers_version')
    a, b = ({k: v for k, v in m.config.to_dict().items() if k not in skip} for m in (trained, control))
    assert a == b and report['loaded'] == 0
    sa, sb = trained.state_dict(), control.state_dict()
    assert sa.keys() == sb.keys()
    body = [k for k in sa if k.startswith(('encoder.', 'bert.')) and sa[k].numel() > 1 and sa[k].float().std() > 0]
    assert body and not any(torch.equal(sa[k], sb[k]) for k in body), 'a pretrained tensor leaked into the control'


def test_random_init_control_of_a_concept_checkpoint(tmp_path):
    from concept_nb.checkpoints import save_model
    from concept_nb.data import load_tokenizer
    from concept_nb.glue import build_classifier, build_embedder
    from concept_nb.heads import build_model
    tok = load_tokenizer('embedded')
    m = build_model('perceiver_mlm', vocab_size=len(tok), hidden_size=32, concept_num=4, num_hidden_layers=1,
                    num_attention_heads=2, intermediate_size=64, max_sequence_length=64, pad_token_id=tok.pad_token_id)
    save_model(m, tok, tmp_path / 'model')
    trained, _ = build_classifier(str(tmp_path / 'model'), 'stsb', tok, seed=5, max_length=64)
    ctl, rep = build_classifier(str(tmp_path / 'model'), 'stsb', tok, seed=5, max_length=64, control='random_init')
    _same_config_fresh_weights(trained, ctl, rep)
    _, enc = build_embedder(str(tmp_path / 'model'), tok, seed=5, max_length=64, control='random_init')
    assert not torch.equal(enc.token_embeddings.weight, m.encoder.token_embeddings.weight)
    with pytest.raises(ValueError, match="needs a checkpoint"): build_classifier('', 'stsb', tok, control='random_init')
