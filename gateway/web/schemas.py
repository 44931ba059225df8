"""The JSON shapes of PRODUCT §5.1, described for the OpenAPI document.

Documentation only: the routes return the very dicts the CLI prints (gateway/store/queries.py),
serialised as the CLI does, so the two cannot drift apart through a model's conversions.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field


class Person(BaseModel):
    email: str
    name: str


class AttachmentMeta(BaseModel):
    filename: str
    content_type: str
    size: int
    sha256: str


class Update(BaseModel):
    id: int
    kind: str
    author: str | None
    text: str
    automatic: bool
    message_id: str | None
    created_at: str
    attachments: list[AttachmentMeta]


class Event(BaseModel):
    model_config = ConfigDict(populate_by_name=True)

    at: str
    kind: str
    from_: str | None = Field(alias="from")
    to: str | None
    by: str
    note: str


class EcrSummary(BaseModel):
    """One element of `ecr list --json`."""

    ref: str = Field(examples=["ECR-000123"])
    status: Literal["active", "pending", "resolved", "reactivated"]
    subject: str
    problem_type: str
    requester: Person | None
    participants: list[str]
    related_to: str | None
    created_at: str
    updated_at: str
    resolved_at: str | None
    score: int | None
    score_comment: str | None


class Ecr(EcrSummary):
    """`ecr show REF --json`."""

    updates: list[Update]
    events: list[Event]


class StatusChange(BaseModel):
    status: Literal["active", "pending", "resolved"]
    note: str = Field("", description="Required for pending (what is needed) and resolved.")


class Problem(BaseModel):
    detail: str


class ReportLine(BaseModel):
    problem_type: str
    active: int
    pending: int
    resolved: int
    reactivated: int
    total: int
    median_first_response_seconds: float | None
    median_resolution_seconds: float | None
    ever_resolved: int
    ever_reactivated: int
    reactivation_rate: float | None
    average_score: float | None
    scores: int


class Report(BaseModel):
    since: str
    until: str
    problem_types: list[ReportLine]
    total: ReportLine
