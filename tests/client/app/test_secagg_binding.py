"""A server that instructs hospitals differently unmasks noise, not one hospital's upload.

Three hospitals speak the real SecAgg+ protocol (tests/support/hostile_server.py: Flower's
secaggplus_mod behind client/app/secagg.py) to a server written step by step. Told the
same thing, their masks cancel and the server reads the sum. Told different things (the
attack: all but one upload nothing), each hospital's masks are bound to its own
instruction, they do not cancel, and the "sum" is noise.
"""

import numpy as np

from shared_model.protocol import Request
from tests.support.hostile_server import (
    CODEC,
    INSTRUCTION,
    LAYOUT,
    NOW,
    Lab,
    unmasked_mean,
    upload_of,
)


def server_mean(tmp_path, instructions: dict[int, dict]) -> np.ndarray:
    """One honest SecAgg+ round over 3 hospitals, each told its own instruction."""
    lab = Lab(tmp_path, NOW, 3)
    everyone = lab.nodes
    lab.setup((3, 3, 2))
    lab.share_keys()
    lab.upload(instructions=dict(zip(everyone, instructions.values(), strict=True)))
    lab.consistency({n: (everyone, everyone) for n in everyone})
    lab.unmask(
        {n: (everyone, [], lab.signatures((everyone, everyone), everyone)) for n in everyone}
    )
    assert not lab.refusals, [r.reason for r in lab.refusals]
    got = unmasked_mean(lab, everyone, 2)
    assert got is not None
    return got


def test_the_same_instruction_gives_the_sum(tmp_path):
    got = server_mean(tmp_path, {n: INSTRUCTION for n in (101, 102, 103)})
    np.testing.assert_allclose(got, sum(upload_of(n) for n in (101, 102, 103)) / 3, atol=1e-5)


def test_instructing_all_but_one_to_upload_nothing_unmasks_noise(tmp_path):
    """The isolation attack of the review, through the real mod: it no longer works."""
    blank = {**INSTRUCTION, Request.EVALUATE: False, Request.EVALUATE_ONLY: True}
    got = server_mean(tmp_path, {101: INSTRUCTION, 102: blank, 103: blank})
    alone = upload_of(101) / 3  # what the server would have read
    assert not np.allclose(got, alone, atol=1e-2)
    # uncorrelated: over its 1,108 values the noise's correlation with the target has a
    # standard deviation of about 1/sqrt(1108) = 0.03 (0.1, 3.3 of them, failed rarely);
    # the target's own upload would give 1
    assert abs(np.corrcoef(got, alone)[0, 1]) < 0.2
    # and the held-out count it would read is not the target's 20 records, but noise
    # (spread over hundreds to millions: within 1000 of 20 now and then, within 1 hardly)
    examples = got[LAYOUT.size + 2] * 3 / CODEC._units()[2]
    assert abs(examples - 20) > 1
