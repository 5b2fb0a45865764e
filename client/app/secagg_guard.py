"""What a hospital checks at every SecAgg+ stage, so that a lying server learns only sums.

Flower's ``secaggplus_mod`` follows whatever the server sends. Against a server that
lies, the hospital keeps its own record of the round (in Flower's node state) and refuses,
by name, any message that would let the server unmask one hospital's upload:

============  ===================================================================
stage         what the hospital checks (``SecAggRefusedError.code`` when it refuses)
============  ===================================================================
key setup     its own floor for the group: hospitals, shares, threshold; keys shared
              with only some hospitals (a graph the server chooses) only if its file
              allows it, and with at least 2 * ceil(log2 n) + 1 (``below-floor``); an
              earlier round of this run (``replay``).
              It then signs its fresh keys with its registered signing key.
key sharing   no more keys than the announced shares, no fewer than the threshold
              and its floor (``key-count``; hospitals lost at key setup are left
              out), distinct ids and members (``duplicate-id``, ``duplicate-member``),
              each key advertisement signed by a member its own members file lists
              (``unlisted-member``, ``forged-signature``); no key share goes elsewhere.
masked        key shares only from the neighbours it exchanged keys with
upload        (``unknown-id``, ``duplicate-id``).
consistency   one view for everyone (Bonawitz et al. 2017): the survivor set must hold
              this hospital, no duplicate, every neighbour it exchanged shares with,
              at least the threshold of them (``split-view``, ``below-threshold``,
              ...); it signs ONE survivor statement per round, bound to the round's
              public keys (``second-statement``).
unmasking     valid signatures over exactly the statement it signed from at least
              max(threshold, a majority of the hospitals that completed the key
              exchange) members (``no-quorum``); the server's active and dropped lists
              must follow that statement (``split-view``, ``both-active-and-dead``).
============  ===================================================================

The first three stages are checked here; the consistency round and the unmasking in
``client/app/secagg_survivors.py``, and the readers they share in
``client/app/secagg_checks.py``. A member's signature over a *different* survivor set is
proof that the server showed hospitals different views: it is kept as evidence
(``<state>/secagg-evidence/``) and the hospital takes no further part in that run
(``run-stopped``, also after a restart). Messages out of order or of another run or round
are refused (``replay``, ``out-of-order``); a round set up again under its own number (a
retry) gets fresh keys, and signatures made for its earlier keys count for nothing. A
refusal happens before Flower's mod sees the message: it releases no share and charges
nothing.
"""

from __future__ import annotations

import logging
import math
import re
from typing import Any

from flwr.app import ConfigRecord, Context, Message
from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS, Key, Stage

from client.app.secagg_checks import (
    SecAggRefusedError,
    SigningKeys,
    distinct,
    node_ids,
    signed_entries,
    signing_keys,
    sparse_share_floor,
)
from client.app.secagg_survivors import SurvivorView, evidence_folder
from shared_model.config import HospitalConfig, RunConfig
from shared_model.protocol import SecAggSigned
from shared_model.secagg_signatures import advert_statement, sign

__all__ = ["SecAggGuard"]

log = logging.getLogger("fedfusion.hospital")
ADVERTS, MEMBER, SIGNATURE = SecAggSigned.ADVERTS, SecAggSigned.MEMBER, SecAggSigned.SIGNATURE
_STATE = "fedfusion-secagg-guard"  # this node's record of the round, in Flower's node state


class SecAggGuard:
    """The hospital's checks around Flower's SecAgg+ mod for one message."""

    def __init__(self, msg: Message, ctxt: Context) -> None:
        self.msg, self.ctxt = msg, ctxt
        self.hospital = HospitalConfig.from_node_config(ctxt.node_config)
        self.state = ctxt.state.config_records.setdefault(_STATE, ConfigRecord())
        self.configs = msg.content.config_records[RECORD_KEY_CONFIGS]
        self.stage = str(self.configs.get(Key.STAGE, ""))
        self.node = msg.metadata.dst_node_id
        self.run = msg.metadata.run_id
        self.pending: dict[str, Any] = {}  # what this message adds to the round, once answered
        self._keys: SigningKeys | None = None
        if not re.fullmatch(r"[0-9]{1,9}", msg.metadata.group_id):
            raise SecAggRefusedError(
                "malformed", f"a SecAgg+ message for round {msg.metadata.group_id!r}"
            )
        self.round = int(msg.metadata.group_id)
        stopped = str(self.state.get("stopped", ""))
        if stopped and self.state.get("run") == self.run:
            raise SecAggRefusedError(
                "run-stopped",
                f"this hospital takes no further part in run {self.run}: {stopped}",
            )

    # ---- helpers
    @property
    def plan(self) -> tuple[int, int, int]:
        """(hospitals sampled, shares, threshold) of this hospital's round."""
        return tuple(self.state.get("plan", [0, 0, 0]))  # type: ignore[return-value]

    def expect(self, stage: str) -> None:
        """The message must continue this hospital's round, at ``stage``."""
        if "run" not in self.state:
            raise SecAggRefusedError(
                "out-of-order",
                f"a {self.stage} message, but this hospital set up no SecAgg+ round in this "
                "run (it declined the key setup, or never received one)",
            )
        if self.state.get("run") != self.run or self.state.get("round") != self.round:
            raise SecAggRefusedError(
                "replay",
                f"a {self.stage} message of run {self.run} round {self.round}, but this "
                f"hospital's SecAgg+ round is run {self.state.get('run')} round "
                f"{self.state.get('round')}",
            )
        if self.state.get("stage") != stage:
            code = "replay" if self.state.get("stage") in ("unmasked", "closed") else "out-of-order"
            raise SecAggRefusedError(
                code,
                f"a {self.stage} message while this hospital's round is at "
                f"{self.state.get('stage')!r} (it expected {stage!r} before it)",
            )

    def keys(self) -> SigningKeys:
        """The hospital's signing key and members file (read once per message)."""
        if self._keys is None:
            run = RunConfig.from_run_config(self.ctxt.run_config)
            self._keys = signing_keys(self.hospital, run.output_dir)
        return self._keys

    def record(self, name: str) -> ConfigRecord:
        """The message's record ``name``; a refusal if the server left it out."""
        record = self.msg.content.config_records.get(name)
        if record is None:
            raise SecAggRefusedError(
                "unsigned",
                f"the {self.stage} message carries no {name} record: this hospital takes part "
                "only in SecAgg+ with signed keys and a signed survivor set (run the same "
                "fedfusion version on the server)",
            )
        return record

    # ---- stages
    def before(self) -> None:
        """Check a Flower SecAgg+ stage message before Flower's mod answers it."""
        {
            Stage.SETUP: self._setup,
            Stage.SHARE_KEYS: self._share_keys,
            Stage.COLLECT_MASKED_VECTORS: self._masked_upload,
            Stage.UNMASK: SurvivorView(self).check_unmask,
        }.get(self.stage, self._unknown)()

    def _unknown(self) -> None:
        raise SecAggRefusedError("malformed", f"unknown SecAgg+ stage {self.stage!r}")

    def _setup(self) -> None:
        values = [self.configs.get(k) for k in (Key.SAMPLE_NUMBER, Key.SHARE_NUMBER, Key.THRESHOLD)]
        if not all(type(v) is int for v in values):
            raise SecAggRefusedError(
                "malformed", "key setup without integer hospitals/shares/threshold"
            )
        n, k, t = values  # type: ignore[misc]
        h = self.hospital
        floor_t = math.ceil(h.secagg_min_threshold * k - 1e-9)
        problems = []
        if n < h.secagg_min_hospitals:
            problems.append(f"{n} hospitals, fewer than its {h.secagg_min_hospitals}")
        if not 3 <= k <= n:
            problems.append(f"{k} shares for {n} hospitals (at least 3, at most one each)")
        if k < n and not h.sparse_shares_accepted:
            problems.append(
                f"{k} shares of {n} hospitals: keys shared with only some hospitals, on a "
                "graph the server chooses, which it can use to isolate one upload (it takes "
                "part only with every hospital sampled: secagg-sparse-shares)"
            )
        elif k < n and k < max(h.secagg_min_shares, sparse_share_floor(n)):
            floor_k = max(h.secagg_min_shares, sparse_share_floor(n))
            problems.append(f"{k} shares of {n} hospitals, below its floor of {floor_k}")
        if t < floor_t or 2 * t <= k or t > k:
            problems.append(
                f"threshold {t} of {k} shares (it needs at least {max(floor_t, k // 2 + 1)})"
            )
        if problems:
            raise SecAggRefusedError(
                "below-floor",
                "declined SecAgg+ parameters below this hospital's floor: "
                + "; ".join(problems)
                + " (secagg-min-hospitals, secagg-min-threshold, secagg-sparse-shares, "
                "secagg-min-shares in its file)",
            )
        kept = sorted(evidence_folder(self).glob(f"run{self.run}-round*.json"))
        if kept:  # it stopped this run before, and was restarted since
            raise SecAggRefusedError(
                "run-stopped",
                f"this hospital takes no further part in run {self.run}: the server showed "
                f"hospitals different survivor sets (evidence: {kept[0]})",
            )
        if self.state.get("run") == self.run and self.round < int(self.state.get("round", 0)):  # type: ignore[arg-type]
            raise SecAggRefusedError(
                "replay",
                f"a key setup for round {self.round}, but this hospital already set up round "
                f"{self.state.get('round')} of this run",
            )
        if self.state.get("run") == self.run and self.round == self.state.get("round"):
            log.info("SecAgg+ round %d set up again (a retry): fresh keys", self.round)
        self.keys()  # a hospital that cannot sign says so now, before any key exists
        # kept only once Flower's mod has made the keys (after), so the two never disagree
        self.pending = {"run": self.run, "round": self.round, "plan": [n, k, t], "stage": "setup"}

    def _share_keys(self) -> None:
        self.expect("setup")
        _, k, t = self.plan
        ids = []
        for key in self.configs:
            if key == Key.STAGE:
                continue
            if not re.fullmatch(r"0|[1-9][0-9]{0,19}", key):  # one spelling per node id
                raise SecAggRefusedError("malformed", f"a key list entry {key!r}")
            ids.append(int(key))
        distinct(ids, "the key list")
        floor = max(t, self.hospital.secagg_min_hospitals)
        if not floor <= len(ids) <= k:
            raise SecAggRefusedError(
                "key-count",
                f"a key list of {len(ids)} hospitals where {k} shares were announced: it "
                f"takes part with at most that many and at least {floor} (the threshold, "
                "and its secagg-min-hospitals)",
            )
        if self.node not in ids:
            raise SecAggRefusedError("malformed", "the key list leaves out this hospital")
        entries = signed_entries(self.record(ADVERTS), "the key advertisements")
        adverts = {nid: (member, signature) for nid, member, signature in entries}
        keys, members, pks = self.keys(), [], []
        for nid in ids:
            pair = self.configs[str(nid)]
            if not (
                isinstance(pair, list)
                and len(pair) == 2
                and all(isinstance(x, bytes) for x in pair)
            ):
                raise SecAggRefusedError("malformed", f"node {nid}'s keys are not two byte strings")
            pk1, pk2 = pair
            member, signature = adverts.get(nid, ("", b""))
            if not keys.members.keys.get(str(member)):
                raise SecAggRefusedError(
                    "unlisted-member",
                    f"node {nid}'s keys are claimed for {member or 'no member'}, which this "
                    f"hospital's members file ({keys.members.source}) does not list: no key "
                    "share goes to it",
                )
            statement = advert_statement(self.run, self.round, nid, self.plan, pk1, pk2)  # type: ignore[arg-type]
            if not keys.members.verify(member, signature, statement):
                raise SecAggRefusedError(
                    "forged-signature",
                    f"node {nid}'s keys do not carry {member}'s signature for this run, round "
                    "and plan: the server may have substituted keys of its own",
                )
            members.append(str(member))
            pks += [pk1, pk2]
        if len(set(members)) != len(members):
            raise SecAggRefusedError("duplicate-member", "the key list holds one member twice")
        if members[ids.index(self.node)] != keys.name:
            raise SecAggRefusedError(
                "malformed", "the key list names this hospital's keys for another"
            )
        self.pending = {
            "neighbours": ids,
            "members": members,
            "public-keys": pks,
            "stage": "shared",
        }

    def _masked_upload(self) -> None:
        self.expect("shared")
        sources = node_ids(self.configs.get(Key.SOURCE_LIST), "the share sources")
        unknown = distinct(sources, "the share sources") - (set(self.neighbours) - {self.node})
        if unknown:
            raise SecAggRefusedError(
                "unknown-id",
                f"key shares said to come from {sorted(unknown)}, which did not exchange keys "
                "with this hospital",
            )
        # one upload per round, even if Flower's mod fails after training
        self.state.update({"partners": sources, "stage": "uploading"})

    @property
    def neighbours(self) -> list[int]:
        """The node ids this hospital exchanged keys with (itself included)."""
        return list(self.state.get("neighbours", []))  # type: ignore[arg-type]

    def abort(self) -> None:
        """Flower's mod failed on this message: the round ends here for this hospital."""
        if self.stage != Stage.SETUP and self.state.get("run") == self.run:
            self.state["stage"] = "closed"

    def after(self, reply: Message) -> Message:
        """Keep what this stage checked; sign the keys of a setup reply."""
        if reply.has_error():
            self.abort()
            return reply
        if self.stage == Stage.SETUP:
            self.state.clear()
        self.state.update(self.pending)
        if self.stage == Stage.SETUP:
            out = reply.content.config_records[RECORD_KEY_CONFIGS]
            pk1, pk2 = bytes(out[Key.PUBLIC_KEY_1]), bytes(out[Key.PUBLIC_KEY_2])  # type: ignore[arg-type]
            keys = self.keys()
            statement = advert_statement(self.run, self.round, self.node, self.plan, pk1, pk2)
            out[MEMBER], out[SIGNATURE] = keys.name, sign(keys.signing, statement)
        elif self.stage == Stage.COLLECT_MASKED_VECTORS:
            self.state["stage"] = "uploaded"
        elif self.stage == Stage.UNMASK:
            self.state["stage"] = "unmasked"
        return reply

    def sign_survivors(self) -> dict[str, Any]:
        """The consistency stage (``client/app/secagg_survivors.py``); the reply's fields."""
        return SurvivorView(self).sign()
