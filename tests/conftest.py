"Checks that need a fresh process start with the session, so they run beside the other tests instead of after them."
import os, subprocess, sys
from types import SimpleNamespace

import pytest, torch


@pytest.fixture(scope='session', autouse=True)
def st_export(request, tmp_path_factory):
    "A tiny random concept checkpoint, its sentence-transformers export (`max_seq_length` = test_embeddings.MAX_LENGTH)"
    "and a fresh process that loads it with `SentenceTransformer(path)` after a plain `import concept_nb` (neither"
    "trust_remote_code nor the hub). Started only when test_embeddings.py is collected; its tests read the result."
    mod = next((i.module for i in request.session.items if i.path.name == 'test_embeddings.py'), None)
    if mod is None:
        yield None
        return
    from concept_nb.checkpoints import save_model
    from concept_nb.data import load_tokenizer
    from concept_nb.embeddings import export_sentence_transformer
    from concept_nb.glue import tiny_config
    from concept_nb.heads import ConceptEncoderForMaskedLM
    tmp, tok = tmp_path_factory.mktemp('st'), load_tokenizer('embedded')
    torch.manual_seed(3)
    save_model(ConceptEncoderForMaskedLM(tiny_config(tok, concept_num=6)), tok, tmp/'ck')
    st = export_sentence_transformer(tmp/'ck', tmp/'st', max_seq_length=mod.MAX_LENGTH)
    code = ("import concept_nb; from sentence_transformers import SentenceTransformer; "
            f"m = SentenceTransformer({str(st)!r}, device='cpu', local_files_only=True); "
            "print(m.encode(['a test']).shape, m.max_seq_length)")
    p = subprocess.Popen([sys.executable, '-c', code], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                         env={**os.environ, 'HF_HUB_OFFLINE': '1'})
    yield SimpleNamespace(ck=tmp/'ck', st=st, tok=tok, plain_import=p)
    if p.poll() is None: p.kill()
