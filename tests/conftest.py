"""Test set-up: 8 host CPU devices (for sharding tests) before JAX starts its backend."""
import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import jax  # noqa: E402
import pytest  # noqa: E402

jax.config.update("jax_default_matmul_precision", "highest")


@pytest.fixture(scope="session")
def t5_tok_dir(tmp_path_factory):
    """A tiny T5 SentencePiece tokenizer trained on the embedded SST-2 sample and the GLUE
    label words (text-to-text tests)."""
    from tokenizers import SentencePieceUnigramTokenizer
    from mtlx.data import load_split
    from transformers import T5TokenizerFast
    text = [ex.texts[0] for ex in load_split("sst2", "train").examples]
    text += ["acceptable unacceptable entailment not_entailment equivalent not_equivalent "
             "0.0 1.2 3.8 4.6 5.0 sentence1 sentence2 rte mrpc stsb cola"] * 20
    sp = SentencePieceUnigramTokenizer()
    sp.train_from_iterator(text, vocab_size=400, special_tokens=["<pad>", "</s>", "<unk>"])
    path = tmp_path_factory.mktemp("t5tok")
    T5TokenizerFast(tokenizer_object=sp._tokenizer, pad_token="<pad>", eos_token="</s>",
                    unk_token="<unk>", extra_ids=0).save_pretrained(path)
    return path


def write_t5_text_to_text_config(path, tok_dir, extra=()):
    """A config file (path) for the local demo run as a tiny T5 with RTE and STS-B in
    text-to-text form (config.text_to_text), tokenized with `tok_dir` (t5_tok_dir); `extra`:
    more statements on the config `c`."""
    demo = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs", "demo.py")
    path.write_text(f"from mtlx.train.config import load_config\n\n"
                    f"def get_config(arg=None):\n"
                    f"    c = load_config({demo + ':local'!r})\n"
                    f"    c.tasks = ('rte', 'stsb')\n"
                    f"    c.text_to_text = True\n"
                    f"    c.data.tokenizer = {str(tok_dir)!r}\n"
                    f"    c.model.family = 't5'\n"
                    f"    c.model.config = dict(vocab_size=400, d_model=16, d_kv=8, d_ff=32,\n"
                    f"                          num_layers=2, num_heads=2)\n"
                    + "".join(f"    {line}\n" for line in extra)
                    + "    return c\n")
    return path


# What the `bucket` fixture's compose does beyond the emulator's own: GCS refuses a compose
# whose ifGenerationMatch differs from the destination's generation (412), which the emulator
# ignores; `honor_compose_preconditions=False` serves the emulator's way (a store that ignores
# the condition). `after_compose(response)`, when set, runs after each compose (tests drop a
# reply so the client retries).
GCS_EMULATOR = type("GcsEmulator", (), {"honor_compose_preconditions": True, "after_compose": None})()


@pytest.fixture(scope="session")
def bucket():
    """gs://mtlx-test, served in memory by a GCS emulator (gcp-storage-emulator) on a free local
    port. It speaks the JSON API that both clients of a run's bucket use: gcsfs (etils.epath:
    metrics.jsonl, eval_results.json, plots, orbax's metadata) and tensorstore's gcs driver
    (orbax's arrays); each is pointed at it by its documented variable."""
    import socket
    from gcp_storage_emulator.exceptions import NotFound
    from gcp_storage_emulator.handlers import objects
    from gcp_storage_emulator.server import create_server

    # GCS sends an object's generation with its bytes (x-goog-generation); the emulator does
    # not, and tensorstore then takes the object as generation 0, which OCDBT's conditional
    # manifest updates reject at random ("Malformed StorageGeneration"). Add the headers.
    plain_download = objects.download

    def download(request, response, storage, *args, **kwargs):
        plain_download(request, response, storage, *args, **kwargs)
        try:
            obj = storage.get_file_obj(request.params["bucket_name"], request.params["object_id"])
        except NotFound:
            return
        response["x-goog-generation"] = obj["generation"]
        response["x-goog-metageneration"] = obj["metageneration"]

    objects.download = download  # objects.get (the JSON API's ?alt=media) looks it up here

    from http import HTTPStatus
    from gcp_storage_emulator import server as emulator_server
    plain_compose = objects.compose

    def compose(request, response, storage, *args, **kwargs):
        want = request.query.get("ifGenerationMatch")
        if want and GCS_EMULATOR.honor_compose_preconditions:
            try:
                now = storage.get_file_obj(request.params["bucket_name"],
                                           request.params["object_id"])["generation"]
            except NotFound:
                now = "0"
            if str(now) != str(want[0]):
                response.status = HTTPStatus.PRECONDITION_FAILED
                return
        plain_compose(request, response, storage, *args, **kwargs)
        if GCS_EMULATOR.after_compose is not None:
            GCS_EMULATOR.after_compose(response)

    routes = [methods for _, methods in emulator_server.HANDLERS
              if methods.get(emulator_server.POST) is plain_compose]
    for methods in routes:
        methods[emulator_server.POST] = compose
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = create_server("127.0.0.1", port, in_memory=True, default_bucket="mtlx-test")
    server.start()
    url = f"http://127.0.0.1:{port}"
    env = {"STORAGE_EMULATOR_HOST": url,             # gcsfs
           "TENSORSTORE_GCS_HTTP_URL": url,          # tensorstore (orbax's arrays)
           "GOOGLE_AUTH_TOKEN_FOR_TESTING": "fake",  # tensorstore: no credentials lookup
           "GOOGLE_CLOUD_PROJECT": "test"}           # google-auth: no project lookup
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        yield "gs://mtlx-test"
    finally:
        server.stop()
        objects.download = plain_download
        for methods in routes:
            methods[emulator_server.POST] = plain_compose
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
