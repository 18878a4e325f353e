"""How a text reply on a waiting A2A task decides its approvals (micro.a2a.tasks): a table, no system.

Only a reply that is wholly an approve word approves; a deny word may carry a reason; anything
else ("yes, but only t5") is refused with the guidance, so a qualified yes never approves everything.
"""

from __future__ import annotations

import pytest
from a2a.utils.errors import InvalidParamsError

from micro.a2a.tasks import approval_of, resume_request
from micro.agent.record import AgentRun, PendingCall

RUN = AgentRun("18ab", "task-mgr", "delete t5 and t6", status="paused",
               pending=[PendingCall("c1", "task_Task_Delete", {"id": "t5"}, "needs approval"),
                        PendingCall("c2", "task_Task_Delete", {"id": "t6"}, "needs approval")])

APPROVE = ["approve", "Approve.", "  yes  ", "YES!", "ok", "OK.", "y", "allow", "approved", "yes."]
DENY = [("deny", ""), ("Deny: keep it for the audit", "keep it for the audit"), ("no", ""), ("No.", ""),
        ("no, not now", "not now"), ("n", ""), ("reject - wrong task", "wrong task"), ("refuse", ""),
        ("denied: t6 is still open", "t6 is still open"), ("NO not t6", "not t6"),
        ("deny:\ntwo lines\nof reason", "two lines\nof reason")]
NEITHER = ["Yes, but only delete t5, not t6", "ok but wait until Monday", "approve: not t6", "yes please delete t5",
           "approve t5", "okay", "nothing", "none of them", "no-one asked", "maybe later", "", "   ", "not t6",
           "yes no", "noted", "don't"]


@pytest.mark.parametrize("text", APPROVE)
def test_a_reply_that_is_only_an_approve_word_approves_every_pending_call(text: str) -> None:
    assert approval_of(text) is True
    assert resume_request(RUN, text, []) == {"run_id": "18ab", "approve_all": True}


@pytest.mark.parametrize(("text", "reason"), DENY)
def test_a_deny_word_denies_with_the_rest_as_its_reason(text: str, reason: str) -> None:
    assert approval_of(text) == reason
    assert resume_request(RUN, text, []) == {"run_id": "18ab", "deny_all": True, "reason": reason}


@pytest.mark.parametrize("text", NEITHER)
def test_anything_else_is_refused_with_how_to_answer(text: str) -> None:
    assert approval_of(text) is None
    with pytest.raises(InvalidParamsError, match=r'task 18ab waits for approval of task_Task_Delete \(call c1\).*'
                                                 r'reply "approve" or "deny: <reason>"'):
        resume_request(RUN, text, [])
