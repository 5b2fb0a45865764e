"""The consistency round and the unmasking, at one hospital: one signed view per round.

Before any hospital releases a share, the survivors agree on one view of the round
(Bonawitz et al. 2017's consistency check): the set of hospitals that completed the key
exchange and the set whose uploads are in the sum. A hospital checks the view against
what it saw itself, signs one per round, bound to the round's public keys, and unmasks
only with enough valid signatures over exactly that view, as that view says. A member's
signature over a different view is kept as evidence, and the hospital stops the run.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any, Protocol

from flwr.app import ConfigRecord, Context
from flwr.common.secure_aggregation.secaggplus_constants import Key

from client.app.secagg_checks import (
    SecAggRefusedError,
    SigningKeys,
    distinct,
    node_ids,
    signed_entries,
)
from shared_model.config import HospitalConfig, RunConfig
from shared_model.protocol import SecAggSigned
from shared_model.secagg_signatures import sign, survivors_statement

__all__ = ["RoundGuard", "SurvivorView", "evidence_folder"]

log = logging.getLogger("fedfusion.hospital")
CONSISTENCY, SIGNATURES = SecAggSigned.CONSISTENCY, SecAggSigned.SIGNATURES
SIGNATURE, COMPLETED, SURVIVORS = (
    SecAggSigned.SIGNATURE,
    SecAggSigned.COMPLETED,
    SecAggSigned.SURVIVORS,
)


class RoundGuard(Protocol):
    """What the survivor checks read of the hospital's guard (client/app/secagg_guard.py).

    Named here, not imported from there: the guard builds a :class:`SurvivorView`.
    """

    ctxt: Context
    hospital: HospitalConfig
    state: ConfigRecord  # this hospital's record of the round, in Flower's node state
    configs: ConfigRecord
    stage: str
    node: int
    run: int
    round: int

    @property
    def plan(self) -> tuple[int, int, int]:
        """(hospitals sampled, shares, threshold) of this hospital's round."""

    @property
    def neighbours(self) -> list[int]:
        """The node ids this hospital exchanged keys with (itself included)."""

    def expect(self, stage: str) -> None:
        """Refuse the message unless it continues this hospital's round at ``stage``."""

    def keys(self) -> SigningKeys:
        """The hospital's signing key and members file."""

    def record(self, name: str) -> ConfigRecord:
        """The message's record ``name``; a refusal if the server left it out."""


class SurvivorView:
    """The survivor set a hospital signs, and the unmasking it then answers."""

    def __init__(self, guard: RoundGuard) -> None:
        self.guard = guard

    def _closed(self, code: str, message: str) -> SecAggRefusedError:
        """End the round for this hospital; the refusal to raise."""
        self.guard.state["stage"] = "closed"
        return SecAggRefusedError(code, message)

    def sign(self) -> dict[str, Any]:
        """The consistency stage: check the survivor set, sign it once; the reply's fields."""
        if self.guard.state.get("stage") == "signed":
            self.guard.expect("signed")
            if self._claimed() == self._signed():
                return {SIGNATURE: self.guard.state["signature"]}  # the same request again
            raise self._closed(
                "second-statement",
                "asked to sign a second, different survivor set for this round: a hospital "
                "signs one view of a round",
            )
        self.guard.expect("uploaded")
        completed, survivors = self._claimed()
        self._check_view(completed, survivors)
        statement = self._statement(completed, survivors)
        signature = sign(self.guard.keys().signing, statement)
        self.guard.state.update(
            {
                "stage": "signed",
                COMPLETED: sorted(completed),
                SURVIVORS: sorted(survivors),
                "signature": signature,
            }
        )
        return {SIGNATURE: signature}

    def _statement(self, completed: list[int], survivors: list[int]) -> bytes:
        """The survivor statement over (completed, survivors), bound to this round's keys.

        With every hospital sampled as a neighbour (shares = hospitals), this hospital
        holds the keys of every hospital that completed the exchange, and binds them;
        with fewer shares it cannot, and the statement is not bound.
        """
        n, k, _ = self.guard.plan
        pks = list(self.guard.state.get("public-keys", []))  # type: ignore[arg-type]
        held = {nid: (pks[2 * i], pks[2 * i + 1]) for i, nid in enumerate(self.guard.neighbours)}
        bound = {nid: held[nid] for nid in completed if nid in held} if k == n else None
        return survivors_statement(
            self.guard.run, self.guard.round, self.guard.plan, completed, survivors, bound
        )  # type: ignore[arg-type]

    def _claimed(self) -> tuple[list[int], list[int]]:
        record = (
            self.guard.configs if self.guard.stage == CONSISTENCY else self.guard.record(SIGNATURES)
        )
        completed = node_ids(record.get(COMPLETED), "the hospitals that completed the key exchange")
        survivors = node_ids(record.get(SURVIVORS), "the survivor set")
        distinct(completed, "the key-exchange set")
        distinct(survivors, "the survivor set")
        return sorted(completed), sorted(survivors)

    def _signed(self) -> tuple[list[int], list[int]]:
        return list(self.guard.state.get(COMPLETED, [])), list(self.guard.state.get(SURVIVORS, []))  # type: ignore[arg-type]

    def _check_view(self, completed: list[int], survivors: list[int]) -> None:
        n, k, t = self.guard.plan
        mine = set(self.guard.state.get("partners", [])) | {self.guard.node}  # type: ignore[arg-type]
        done, alive = set(completed), set(survivors)
        problems = []
        if self.guard.node not in alive:
            problems.append("this hospital is not in the survivor set although it uploaded")
        if not alive <= done:
            problems.append("a survivor did not complete the key exchange")
        if done & set(self.guard.neighbours) != mine:
            problems.append(
                "the key-exchange set disagrees with the neighbours that sent this hospital "
                "their key shares"
            )
        if (k == n and not done <= set(self.guard.neighbours)) or len(done) > n:
            problems.append("it names hospitals this hospital never exchanged keys with")
        if problems:
            raise SecAggRefusedError(
                "split-view", "refused the survivor set: " + "; ".join(problems)
            )
        if len(alive & mine) < t:
            raise SecAggRefusedError(
                "below-threshold",
                f"{len(alive & mine)} of the survivors exchanged keys with this hospital, "
                f"fewer than the threshold {t}: their sum would expose too few hospitals",
            )

    def check_unmask(self) -> None:
        """Refuse an unmasking that does not follow the one survivor set signed."""
        if (
            self.guard.state.get("run") == self.guard.run
            and self.guard.state.get("stage") == "uploaded"
        ):
            raise self._closed(
                "unsigned",
                "an unmasking request without a signed survivor set: the consistency round "
                "was skipped",
            )
        self.guard.expect("signed")
        self.guard.state["stage"] = "closed"  # whatever follows, one unmasking per round
        claimed, signed = self._claimed(), self._signed()
        entries = signed_entries(self.guard.record(SIGNATURES), "the survivor signatures")
        if claimed != signed:
            self._contradiction(claimed, entries)
        t = self.guard.plan[2]
        statement = self._statement(*signed)
        keys, known = (
            self.guard.keys(),
            dict(zip(self.guard.neighbours, self.guard.state.get("members", []), strict=True)),
        )  # type: ignore[arg-type]
        quorum = max(t, len(signed[0]) // 2 + 1)
        valid: set[str] = set()
        survivors = set(signed[1])
        for nid, member, signature in entries:
            if len(valid) >= quorum:  # enough: the rest need not be checked
                break
            if nid not in survivors or known.get(nid, member) != member or member in valid:
                continue
            if keys.members.verify(member, signature, statement):
                valid.add(member)
        if len(valid) < quorum:
            raise SecAggRefusedError(
                "no-quorum",
                f"{len(valid)} valid signatures over the survivor set this hospital signed, "
                f"{quorum} needed (the threshold, and a majority of the {len(signed[0])} "
                "hospitals that completed the key exchange)",
            )
        self._check_lists(set(signed[1]))

    def _check_lists(self, alive: set[int]) -> None:
        active = node_ids(self.guard.configs.get(Key.ACTIVE_NODE_ID_LIST), "the active list")
        dead = node_ids(self.guard.configs.get(Key.DEAD_NODE_ID_LIST), "the dropped list")
        distinct(active, "the active list")
        distinct(dead, "the dropped list")
        if set(active) & set(dead) or self.guard.node in dead:
            raise SecAggRefusedError(
                "both-active-and-dead",
                "an unmasking request lists a hospital as both active and dropped out, or "
                "this hospital as dropped out",
            )
        mine = set(self.guard.state.get("partners", [])) | {self.guard.node}  # type: ignore[arg-type]
        if set(active) != alive & mine or set(dead) & alive or (mine - alive) - set(dead):
            raise SecAggRefusedError(
                "split-view",
                "the unmasking request's active and dropped lists do not follow the survivor "
                "set the hospitals signed",
            )
        # dropped neighbours that never sent this hospital shares: nothing to release
        self.guard.configs[Key.DEAD_NODE_ID_LIST] = sorted(set(dead) & mine)

    def _contradiction(
        self, claimed: tuple[list[int], list[int]], entries: list[tuple[int, str, bytes]]
    ) -> None:
        """A survivor set other than the one signed: keep signed proof, stop the run."""
        statement = self._statement(*claimed)
        keys = self.guard.keys()
        proof = [
            {"node": nid, "member": member, "signature": signature.hex()}
            for nid, member, signature in entries
            if keys.members.verify(member, signature, statement)
        ]
        if not proof:
            raise SecAggRefusedError(
                "split-view",
                "the unmasking request is for a survivor set this hospital did not sign, with "
                "no valid signature over it",
            )
        path = self._keep_evidence(claimed, statement, proof)
        reason = (
            f"the server showed hospitals different survivor sets in round {self.guard.round} "
            f"(signed by {', '.join(sorted(p['member'] for p in proof))}; evidence: {path})"
        )
        self.guard.state["stopped"] = reason
        raise SecAggRefusedError("split-view", reason)

    def _keep_evidence(self, claimed: tuple, statement: bytes, proof: list) -> Path:
        folder = evidence_folder(self.guard)
        folder.mkdir(parents=True, exist_ok=True)
        path = folder / f"run{self.guard.run}-round{self.guard.round}.json"
        own = self._statement(*self._signed())
        evidence = {
            "what": "signed survivor sets that contradict each other in one SecAgg+ round",
            "run": self.guard.run,
            "round": self.guard.round,
            "signed-by-this-hospital": {
                "statement": own.decode("utf-8"),
                "signature": bytes(self.guard.state["signature"]).hex(),  # type: ignore[arg-type]
            },
            "shown-to-this-hospital": {"statement": statement.decode("utf-8"), "signed": proof},
        }
        path.write_text(json.dumps(evidence, indent=2) + "\n", encoding="utf-8")
        log.error("SecAgg+: contradicting survivor sets kept as evidence in %s", path)
        return path


def evidence_folder(guard: RoundGuard) -> Path:
    """Where the hospital keeps proof that a server showed hospitals different views."""
    run = RunConfig.from_run_config(guard.ctxt.run_config)
    return guard.hospital.ledger_dir(run.output_dir) / "secagg-evidence"
