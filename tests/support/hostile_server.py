"""A SecAgg+ coordinator that lies, driving the real hospital-side code message by message.

:class:`Lab` holds N hospitals, each a ClientApp with the hospital's real SecAgg+ mods
(``outbound_guard`` and ``secagg_mod``, the same stack as ``client/app/client_app.py``)
and a train handler that uploads known values, so that a reconstruction can be checked
to the bit. The server is written here stage by stage, as Flower's workflow does it, but
every message is the test's to choose: key lists with substituted keys, withheld key
shares, each hospital's own survivor set, duplicate ids, replayed records. The lab keeps
everything a server would see (public keys, masked uploads, released shares) and
:meth:`Lab.reconstruct` tries to unmask one hospital's upload from it.

``TODAYS_HOSPITAL`` is the fixture of the hospital code as it was before hospitals signed
their keys and survivor sets (Flower's mod behind the parameter checks alone): each attack
is first shown to reconstruct an upload against it.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from flwr.app import ConfigRecord, Context, Message, RecordDict
from flwr.client.mod import secaggplus_mod
from flwr.clientapp import ClientApp
from flwr.clientapp.typing import ClientAppCallable
from flwr.common import FitIns, MessageType, bytes_to_ndarray, ndarrays_to_parameters
from flwr.common.secure_aggregation.crypto.symmetric_encryption import decrypt, encrypt
from flwr.common.secure_aggregation.ndarrays_arithmetic import factor_extract
from flwr.common.secure_aggregation.quantization import dequantize
from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS, Key, Stage
from flwr.common.secure_aggregation.secaggplus_utils import (
    share_keys_plaintext_concat,
    share_keys_plaintext_separate,
)
from flwr.compat.common import recorddict_compat as compat

from client.app.outbound import outbound_guard
from client.app.secagg import (
    MASKS,
    compact_masked_vector,
    instruction_digest,
    legacy_fit_reply,
    legacy_request,
    masked_upload,
    secagg_mod,
)
from shared_model import secagg_primitives as sp
from shared_model.evaluation import EvalStats
from shared_model.masked_upload import UploadCodec
from shared_model.packing import WeightLayout
from shared_model.protocol import Request, SecAggSigned, Status
from tests.support.flower import make_context, make_message

__all__ = [
    "NOW",
    "TODAYS_HOSPITAL",
    "Lab",
    "RefusedError",
    "exact",
    "hospital_app",
    "unmasked_mean",
    "upload_of",
]

LAYOUT = WeightLayout.of({"w": torch.zeros(300)})
LABELS = ("a", "b")
CLIP, TARGET, MODULUS, MAX_WEIGHT = 0.5, 2**22, 2**32, 10_000.0
CODEC = UploadCodec(LAYOUT.size, LABELS, CLIP, MAX_WEIGHT)
INSTRUCTION = {Request.SERVER_ROUND: 1, Request.SECAGG_SCHEME: sp.SCHEME, Request.EVALUATE: True}
S = SecAggSigned
WEIGHTS = ndarrays_to_parameters([np.zeros(LAYOUT.size, np.float32)])  # the model sent


def upload_of(node: int, instruction: dict | None = None) -> np.ndarray:
    """What hospital ``node`` uploads: values the test knows (nothing if told evaluate-only)."""
    if (instruction or {}).get(Request.EVALUATE_ONLY):
        return CODEC.encode(np.zeros(LAYOUT.size), 0.0, float("nan"), EvalStats.zeros(LABELS))
    rng = np.random.default_rng(node)
    stats = EvalStats.from_predictions(
        LABELS, rng.normal(size=(20, 2)), (rng.random((20, 2)) < 0.5).astype(float), rng.random(20)
    )
    return CODEC.encode(rng.normal(scale=0.01, size=LAYOUT.size), 0.02, 0.4, stats)


def _todays_checks(msg: Message, ctxt: Context) -> None:
    """The hospital's SecAgg+ checks before signed keys: parameters and list overlaps only."""
    configs = msg.content.config_records[RECORD_KEY_CONFIGS]
    stage = configs.get(Key.STAGE)
    state = ctxt.state.config_records.setdefault("today", ConfigRecord())
    if stage == Stage.SETUP:
        n, k, t = (int(configs[x]) for x in (Key.SAMPLE_NUMBER, Key.SHARE_NUMBER, Key.THRESHOLD))  # type: ignore[arg-type]
        if n < 3 or k < 3 or t < 2 or 2 * t <= k:
            raise ValueError("refused SecAgg+ parameters")
        state["shares"] = k
    elif stage == Stage.SHARE_KEYS:
        if len([x for x in configs if x != Key.STAGE]) != state.get("shares"):
            raise ValueError("refused a key list")
    elif stage == Stage.UNMASK:
        active = set(configs[Key.ACTIVE_NODE_ID_LIST])  # type: ignore[arg-type]
        dead = set(configs[Key.DEAD_NODE_ID_LIST])  # type: ignore[arg-type]
        if active & dead or msg.metadata.dst_node_id in dead:
            raise ValueError("refused an unmasking request")


def _todays_secagg_mod(msg: Message, ctxt: Context, call_next: ClientAppCallable) -> Message:
    if RECORD_KEY_CONFIGS not in msg.content.config_records:
        return call_next(msg, ctxt)
    _todays_checks(msg, ctxt)
    if (
        msg.content.config_records[RECORD_KEY_CONFIGS].get(Key.STAGE)
        != Stage.COLLECT_MASKED_VECTORS
    ):
        return secaggplus_mod(msg, ctxt, call_next)
    with MASKS.bound(instruction_digest(msg)), masked_upload(ctxt):
        return compact_masked_vector(secaggplus_mod(msg, ctxt, call_next))


TODAYS_HOSPITAL = (outbound_guard, _todays_secagg_mod)
NOW = (outbound_guard, secagg_mod)


def hospital_app(
    mods: Sequence[Callable] = NOW,
    upload: Callable[[int, dict], np.ndarray] = upload_of,
    codec: UploadCodec = CODEC,
    layout: WeightLayout = LAYOUT,
) -> ClientApp:
    """A ClientApp with the hospital's SecAgg+ mods whose training uploads ``upload``."""
    app = ClientApp(mods=list(mods))

    @app.train()
    def train(msg: Message, ctx: Context) -> Message:
        _, config = legacy_request(msg, layout)
        reply = {Status.HOSPITAL_ID: f"node-{ctx.node_id}", "declined": 0}
        return legacy_fit_reply(msg, upload(ctx.node_id, config), codec, reply)  # type: ignore[arg-type]

    return app


class RefusedError(Exception):
    """A hospital answered with an error; ``code`` is its refusal's name, if it gave one."""

    def __init__(self, node: int, reason: str) -> None:
        super().__init__(f"node {node}: {reason}")
        self.node, self.reason = node, reason
        self.code = reason.split("[", 1)[1].split("]", 1)[0] if "SecAggRefused" in reason else ""


@dataclass
class Lab:
    """Hospitals with real SecAgg+ code, and what a hostile server collected from them."""

    tmp: Path
    mods: Sequence[Callable] = NOW
    hospitals: int = 3
    node_policy: dict = field(default_factory=dict)
    run: int = 1

    def __post_init__(self) -> None:
        self.app = hospital_app(self.mods)
        self.nodes = [101 + i for i in range(self.hospitals)]
        run_config = {"output-dir": str(self.tmp)}
        self.ctx = {
            n: make_context(
                run_config,
                {"partition-id": i, "num-partitions": self.hospitals, **self.node_policy},
                node_id=n,
            )
            for i, n in enumerate(self.nodes)
        }
        self.keys: dict[int, tuple[bytes, bytes]] = {}
        self.adverts: dict[int, tuple[str, bytes]] = {}
        self.inbox: dict[int, list[tuple[int, bytes]]] = {}
        self.sent_to: dict[int, dict[int, bytes]] = {}  # src -> dst -> ciphertext
        self.masked: dict[int, list[np.ndarray]] = {}
        self.signed: dict[int, bytes] = {}
        self.shares: dict[tuple[int, str], dict[int, bytes]] = {}  # (owner, b|sk) -> x -> share
        self.partners: dict[int, list[int]] = {}
        self.refusals: list[RefusedError] = []
        self.fakes: dict[int, tuple] = {}  # victim -> the server's (sk1, pk1, sk2, pk2) for it
        self.round = 1

    # ---- one message
    def send(
        self, node: int, stage: str, values: dict, records: dict | None = None, **meta
    ) -> ConfigRecord:
        """Send one SecAgg+ stage message; the reply's configs, or RefusedError."""
        content = RecordDict(dict(records or {}))
        content.config_records[RECORD_KEY_CONFIGS] = ConfigRecord({Key.STAGE: stage, **values})
        msg = make_message(
            content,
            MessageType.TRAIN,
            node,
            run_id=meta.get("run", self.run),
            group_id=str(meta.get("round", self.round)),
        )
        reply = self.app(msg, self.ctx[node])
        if reply.has_error():
            refused = RefusedError(node, reply.error.reason)
            self.refusals.append(refused)
            raise refused
        return reply.content.config_records[RECORD_KEY_CONFIGS]

    def each(self, nodes: Sequence[int], do: Callable[[int], None]) -> None:
        """``do(node)`` for each node, collecting refusals instead of stopping."""
        for n in nodes:
            with contextlib.suppress(RefusedError):
                do(n)

    # ---- the stages, as a server that may lie sends them
    def setup(self, plan: tuple[int, int, int], nodes: Sequence[int] | None = None, **meta) -> None:
        """Key setup with (hospitals, shares, threshold) = ``plan``."""
        n, k, t = plan
        values = {
            Key.SAMPLE_NUMBER: n, Key.SHARE_NUMBER: k, Key.THRESHOLD: t,
            Key.CLIPPING_RANGE: CLIP, Key.TARGET_RANGE: TARGET, Key.MOD_RANGE: MODULUS,
            Key.MAX_WEIGHT: MAX_WEIGHT,
        }  # fmt: skip

        def one(node: int) -> None:
            got = self.send(node, Stage.SETUP, values, **meta)
            self.keys[node] = (bytes(got[Key.PUBLIC_KEY_1]), bytes(got[Key.PUBLIC_KEY_2]))  # type: ignore[arg-type]
            self.adverts[node] = (
                str(got.get(S.MEMBER, "")),
                bytes(got.get(S.SIGNATURE, b"")),  # type: ignore[arg-type]
            )

        self.each(nodes or self.nodes, one)

    def key_list(self, members: Sequence[int]) -> tuple[dict, dict]:
        """The key list and advertisements record a server sends for ``members``."""
        keys = {str(m): list(self.keys[m]) for m in members}
        adverts = ConfigRecord(
            {
                S.NODES: list(members),
                S.MEMBERS: [self.adverts[m][0] for m in members],
                S.SIGS: [self.adverts[m][1] for m in members],
            }
        )
        return keys, {S.ADVERTS: adverts}

    def substituted(self, members: Sequence[int], victims: Sequence[int]) -> tuple[dict, dict]:
        """A key list in which the server's own keys stand for ``victims``' (signatures kept)."""
        keys, records = self.key_list(members)
        for victim in victims:
            sk1, pk1 = sp.generate_key_pairs()
            sk2, pk2 = sp.generate_key_pairs()
            self.fakes[victim] = (
                sk1,
                sp.public_key_to_bytes(pk1),
                sk2,
                sp.public_key_to_bytes(pk2),
            )
            keys[str(victim)] = [self.fakes[victim][1], self.fakes[victim][3]]
        return keys, records

    def _fake_channel(self, victim: int, node: int) -> bytes:
        sk2 = self.fakes[victim][2]
        return sp.generate_shared_key(sk2, sp.bytes_to_public_key(self.keys[node][1]))

    def forge_shares(self, node: int) -> None:
        """Key shares "from" each victim to ``node``, made by the server under its fake keys.

        It also reads the shares ``node`` sent to the victims: they were encrypted for the
        server's keys.
        """
        for victim in self.fakes:
            junk = sp.create_shares(b"x" * 32, 2, 3)[0]
            text = share_keys_plaintext_concat(victim, node, junk, junk)
            self.sent_to.setdefault(victim, {})[node] = encrypt(
                self._fake_channel(victim, node), text
            )
            if victim in self.sent_to.get(node, {}):
                plain = decrypt(self._fake_channel(victim, node), self.sent_to[node][victim])
                _, _, b_share, sk_share = share_keys_plaintext_separate(plain)
                for kind, share in (("b", b_share), ("sk", sk_share)):
                    index = int.from_bytes(share[:4], "little")
                    self.shares.setdefault((node, kind), {})[index] = share

    def share_keys(self, lists: dict[int, tuple[dict, dict]] | None = None, **meta) -> None:
        """Send each hospital its key list (default: everyone's real keys)."""
        lists = lists or {n: self.key_list(self.nodes) for n in self.keys}

        def one(node: int) -> None:
            keys, records = lists[node]
            got = self.send(node, Stage.SHARE_KEYS, keys, records, **meta)
            dsts, texts = got[Key.DESTINATION_LIST], got[Key.CIPHERTEXT_LIST]
            self.sent_to[node] = dict(zip(dsts, texts, strict=True))  # type: ignore[arg-type]

        self.each(sorted(lists), one)

    def upload(
        self,
        withhold: dict[int, set[int]] | None = None,
        instructions: dict[int, dict] | None = None,
        **meta,
    ) -> None:
        """Forward key shares (minus ``withhold[dst]``'s sources) with the instruction.

        ``instructions``: a fit config per hospital (default: the same for all).
        """
        withhold = withhold or {}
        instructions = instructions or {}

        def one(node: int) -> None:
            srcs = [
                s
                for s in self.sent_to
                if node in self.sent_to[s] and s not in withhold.get(node, set())
            ]
            config = dict(instructions.get(node, INSTRUCTION))
            fitins = compat.fitins_to_recorddict(FitIns(WEIGHTS, config), keep_input=True)
            values = {
                Key.CIPHERTEXT_LIST: [self.sent_to[s][node] for s in srcs],
                Key.SOURCE_LIST: srcs,
            }
            got = self.send(node, Stage.COLLECT_MASKED_VECTORS, values, dict(fitins), **meta)
            self.masked[node] = [
                bytes_to_ndarray(b).astype(np.int64) for b in got[Key.MASKED_PARAMETERS]
            ]  # type: ignore[union-attr]
            self.partners[node] = srcs

        self.each([n for n in self.nodes if n in self.sent_to], one)

    def consistency(self, views: dict[int, tuple[list[int], list[int]]], **meta) -> None:
        """Ask each hospital to sign ``views[node]`` = (key exchange completed, survivors)."""

        def one(node: int) -> None:
            completed, survivors = views[node]
            values = {S.COMPLETED: completed, S.SURVIVORS: survivors}
            got = self.send(node, S.CONSISTENCY, values, **meta)
            self.signed[node] = bytes(got[S.SIGNATURE])  # type: ignore[arg-type]

        self.each(sorted(views), one)

    def signatures(self, view: tuple[list[int], list[int]], signers: Sequence[int]) -> dict:
        """The signatures record over ``view`` with what ``signers`` signed."""
        record = ConfigRecord(
            {
                S.COMPLETED: list(view[0]),
                S.SURVIVORS: list(view[1]),
                S.NODES: list(signers),
                S.MEMBERS: [self.adverts[s][0] for s in signers],
                S.SIGS: [self.signed[s] for s in signers],
            }
        )
        return {S.SIGNATURES: record}

    def unmask(self, lists: dict[int, tuple[list[int], list[int], dict]], **meta) -> None:
        """Send each hospital (active, dead, records); keep every share released."""

        def one(node: int) -> None:
            active, dead, records = lists[node]
            values = {Key.ACTIVE_NODE_ID_LIST: active, Key.DEAD_NODE_ID_LIST: dead}
            got = self.send(node, Stage.UNMASK, values, records, **meta)
            owners, shares = got[Key.NODE_ID_LIST], got[Key.SHARE_LIST]
            alive = set(active)
            for owner, share in zip(owners, shares, strict=True):  # type: ignore[arg-type]
                kind = "b" if owner in alive else "sk"
                self.shares.setdefault((owner, kind), {})[int.from_bytes(share[:4], "little")] = (
                    share
                )

        self.each(sorted(lists), one)

    # ---- what the server learns
    def _secret(self, owner: int, kind: str, threshold: int) -> bytes | None:
        got = list(self.shares.get((owner, kind), {}).values())
        if len(got) < threshold:
            return None
        try:
            return sp.combine_shares(got[:threshold])
        except ValueError:
            return None

    def reconstruct(self, target: int, threshold: int) -> np.ndarray | None:
        """``target``'s own upload from what the server collected, or None if it cannot."""
        if target not in self.masked:
            return None
        seed = self._secret(target, "b", threshold)
        if seed is None:
            return None
        digest = sp.round_binding(INSTRUCTION, WEIGHTS.tensors)
        vector = [v.copy() for v in self.masked[target]]
        shapes = [v.shape for v in vector]
        vector = [
            v - m for v, m in zip(vector, sp.pseudo_rand_gen(seed, MODULUS, shapes), strict=True)
        ]
        sk_target = self._secret(target, "sk", threshold)
        with MASKS.bound(digest):
            for partner in self.partners[target]:
                sk_partner = self._secret(partner, "sk", threshold)
                if partner in self.fakes:  # the server's own key stood for this partner
                    key = MASKS.shared_key(
                        self.fakes[partner][0], sp.bytes_to_public_key(self.keys[target][0])
                    )
                elif sk_target is not None:
                    key = MASKS.shared_key(
                        sp.bytes_to_private_key(sk_target),
                        sp.bytes_to_public_key(self.keys[partner][0]),
                    )
                elif sk_partner is not None:
                    key = MASKS.shared_key(
                        sp.bytes_to_private_key(sk_partner),
                        sp.bytes_to_public_key(self.keys[target][0]),
                    )
                else:
                    return None
                mask = sp.pseudo_rand_gen(key, MODULUS, shapes)
                sign = 1 if target > partner else -1
                vector = [v - sign * m.astype(np.int64) for v, m in zip(vector, mask, strict=True)]
        q_ratio, rest = factor_extract([np.mod(v, MODULUS) for v in vector])
        (values,) = dequantize(rest, CLIP, TARGET)
        return values * (TARGET / q_ratio)


def unmasked_mean(lab: Lab, survivors: Sequence[int], threshold: int) -> np.ndarray | None:
    """What the server unmasks as Flower does: the mean upload of ``survivors``."""
    total = None
    for node in survivors:
        vec = lab.masked[node]
        total = list(vec) if total is None else [t + v for t, v in zip(total, vec, strict=True)]
    assert total is not None
    shapes = [t.shape for t in total]
    digest = sp.round_binding(INSTRUCTION, WEIGHTS.tensors)
    for node in survivors:
        seed = lab._secret(node, "b", threshold)
        if seed is None:
            return None
        total = [
            t - m for t, m in zip(total, sp.pseudo_rand_gen(seed, MODULUS, shapes), strict=True)
        ]
    with MASKS.bound(digest):
        for dead in {p for n in survivors for p in lab.partners[n]} - set(survivors):
            secret = lab._secret(dead, "sk", threshold)
            if secret is None:
                return None
            for node in (n for n in survivors if dead in lab.partners[n]):
                key = MASKS.shared_key(
                    sp.bytes_to_private_key(secret), sp.bytes_to_public_key(lab.keys[node][0])
                )
                mask = sp.pseudo_rand_gen(key, MODULUS, shapes)
                sign = 1 if node > dead else -1
                total = [t - sign * m.astype(np.int64) for t, m in zip(total, mask, strict=True)]
    q_total, rest = factor_extract([np.mod(t, MODULUS) for t in total])
    (mean,) = dequantize(rest, CLIP, TARGET)
    return (mean - (len(survivors) - 1) * CLIP) * (TARGET / q_total)


def exact(got: np.ndarray | None, node: int) -> bool:
    """Whether ``got`` is ``node``'s upload, to within the quantization step."""
    return got is not None and bool(
        np.allclose(got, upload_of(node), atol=4 * CLIP / TARGET * 1.01)
    )
