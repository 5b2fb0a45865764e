"""A server that instructs hospitals differently unmasks noise, not one hospital's upload.

Three hospitals speak the real SecAgg+ protocol (Flower's secaggplus_mod behind
client/app/secagg.py) to a server written here, step by step as Flower's workflow does it.
Told the same thing, their masks cancel and the server reads the sum. Told different
things (the attack: all but one upload nothing), each hospital's masks are bound to its
own instruction, they do not cancel, and the "sum" is noise.
"""

import numpy as np
import torch
from flwr.app import ConfigRecord, Context, Message, RecordDict
from flwr.clientapp import ClientApp
from flwr.common import FitIns, MessageType, bytes_to_ndarray, ndarrays_to_parameters
from flwr.common.secure_aggregation.ndarrays_arithmetic import factor_extract
from flwr.common.secure_aggregation.quantization import dequantize
from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS, Key, Stage
from flwr.compat.common import recorddict_compat as compat

from client.app.secagg import legacy_fit_reply, legacy_request, secagg_mod
from shared_model import secagg_primitives as sp
from shared_model.evaluation import EvalStats
from shared_model.masked_upload import UploadCodec
from shared_model.packing import WeightLayout
from shared_model.protocol import Request
from tests.support.flower import make_context, make_message

LAYOUT = WeightLayout.of({"w": torch.zeros(300)})
LABELS = ("a", "b")
CODEC = UploadCodec(LAYOUT.size, LABELS, 0.5, 10_000)
TARGET, MODULUS = 2**22, 2**32
ROUND = {Request.SERVER_ROUND: 1, Request.SECAGG_SCHEME: sp.SCHEME}


def upload_of(node: int, config) -> np.ndarray:
    """What each fake hospital uploads: known values, nothing if told evaluate-only."""
    rng = np.random.default_rng(node)
    stats = EvalStats.from_predictions(
        LABELS, rng.normal(size=(20, 2)), (rng.random((20, 2)) < 0.5).astype(float), rng.random(20)
    )
    if config.get(Request.EVALUATE_ONLY):
        return CODEC.encode(np.zeros(LAYOUT.size), 0.0, float("nan"), EvalStats.zeros(LABELS))
    return CODEC.encode(rng.normal(scale=0.01, size=LAYOUT.size), 0.02, 0.4, stats)


def hospitals() -> ClientApp:
    app = ClientApp(mods=[secagg_mod])

    @app.train()
    def train(msg: Message, ctx: Context) -> Message:
        _, config = legacy_request(msg, LAYOUT)
        return legacy_fit_reply(msg, upload_of(ctx.node_id, config), CODEC, {"declined": 0})

    return app


def stage(node: int, st: str, extra: RecordDict | None = None, **values) -> Message:
    content = extra or RecordDict()
    content.config_records[RECORD_KEY_CONFIGS] = ConfigRecord({Key.STAGE: st, **values})
    return make_message(content, MessageType.TRAIN, node)


def configs(reply: Message) -> ConfigRecord:
    assert not reply.has_error(), reply.error
    return reply.content.config_records[RECORD_KEY_CONFIGS]


def server_sum(instructions: dict[int, dict]) -> np.ndarray:
    """One SecAgg+ round over 3 hospitals; the vector the server unmasks (mean of uploads)."""
    app, nodes = hospitals(), sorted(instructions)
    contexts = {n: make_context({}, {}, node_id=n) for n in nodes}
    keys = {}
    for n in nodes:
        setup = {
            Key.SAMPLE_NUMBER: 3, Key.SHARE_NUMBER: 3, Key.THRESHOLD: 2,
            Key.CLIPPING_RANGE: 0.5, Key.TARGET_RANGE: TARGET, Key.MOD_RANGE: MODULUS,
            Key.MAX_WEIGHT: 10_000.0,
        }  # fmt: skip
        got = configs(app(stage(n, Stage.SETUP, **setup), contexts[n]))
        keys[str(n)] = [got[Key.PUBLIC_KEY_1], got[Key.PUBLIC_KEY_2]]
    inbox = {n: ([], []) for n in nodes}
    for n in nodes:
        got = configs(app(stage(n, Stage.SHARE_KEYS, **keys), contexts[n]))
        for dst, text in zip(got[Key.DESTINATION_LIST], got[Key.CIPHERTEXT_LIST], strict=True):
            inbox[dst][0].append(text)
            inbox[dst][1].append(n)
    weights = ndarrays_to_parameters([np.zeros(LAYOUT.size, np.float32)])
    total = None
    for n in nodes:
        fitins = compat.fitins_to_recorddict(FitIns(weights, instructions[n]), keep_input=True)
        sent = {Key.CIPHERTEXT_LIST: inbox[n][0], Key.SOURCE_LIST: inbox[n][1]}
        got = configs(app(stage(n, Stage.COLLECT_MASKED_VECTORS, fitins, **sent), contexts[n]))
        vector = [bytes_to_ndarray(b).astype(np.int64) for b in got[Key.MASKED_PARAMETERS]]
        total = vector if total is None else [t + v for t, v in zip(total, vector, strict=True)]
    seeds: dict[int, list[bytes]] = {}
    for n in nodes:
        unmask = {Key.ACTIVE_NODE_ID_LIST: nodes, Key.DEAD_NODE_ID_LIST: []}
        got = configs(app(stage(n, Stage.UNMASK, **unmask), contexts[n]))
        for owner, share in zip(got[Key.NODE_ID_LIST], got[Key.SHARE_LIST], strict=True):
            seeds.setdefault(owner, []).append(share)
    shapes = [t.shape for t in total]
    for shares in seeds.values():  # remove each hospital's private mask, as Flower does
        private = sp.pseudo_rand_gen(sp.combine_shares(shares), MODULUS, shapes)
        total = [t - m for t, m in zip(total, private, strict=True)]
    q_total, rest = factor_extract([np.mod(t, MODULUS) for t in total])
    (mean,) = dequantize(rest, 0.5, TARGET)
    return (mean - (len(nodes) - 1) * 0.5) * (TARGET / q_total)


def test_the_same_instruction_gives_the_sum():
    same = {n: {**ROUND, Request.EVALUATE: True} for n in (11, 12, 13)}
    got = server_sum(same)
    want = sum(upload_of(n, same[n]) for n in same) / 3
    np.testing.assert_allclose(got, want, atol=1e-5)


def test_instructing_all_but_one_to_upload_nothing_unmasks_noise():
    """The isolation attack of the review, through the real mod: it no longer works."""
    target = {**ROUND, Request.EVALUATE: True}
    blank = {**ROUND, Request.EVALUATE: False, Request.EVALUATE_ONLY: True}
    got = server_sum({11: target, 12: blank, 13: blank})
    alone = upload_of(11, target) / 3  # what the server would have read
    assert not np.allclose(got, alone, atol=1e-2)
    assert abs(np.corrcoef(got, alone)[0, 1]) < 0.1
    # and the held-out count it would read is not the target's 20 records, but noise
    examples = got[LAYOUT.size + 2] * 3 / CODEC._units()[2]
    assert abs(examples - 20) > 1000
