"""Faults of the team platform, and what makes the flows survive them.

* A worker machine that dies (power, OOM killer, ``kill -9``) leaves its flow run RUNNING for ever: nothing is left
  to report its end. Every flow run sends a heartbeat event (``prefect.flow-run.heartbeat``) every
  ``PREFECT_FLOWS_HEARTBEAT_FREQUENCY`` seconds (:data:`HEARTBEAT_S` on workers, see :data:`CLIENT_SETTINGS`);
  :func:`ensure_crash_detection` creates the server-side automation (Prefect's "zombie flows" recipe: a proactive
  trigger) that marks a watched run CRASHED when :data:`MISSED_HEARTBEATS` heartbeats in a row did not come, so a
  new run of the retrain can be started (its finished stages come from the cache).
  It watches the runs tagged ``mapex`` (the deployments of :mod:`flows.deployments`, run by ``mapex worker``,
  which sends heartbeats every :data:`HEARTBEAT_S` s): a flow started elsewhere (a local ``mapex retrain``)
  keeps Prefect's default of 180 s and is not watched, so it is never marked CRASHED while it runs.
* PostgreSQL restarting under the servers: both servers keep running (their SQLAlchemy pools ping a connection
  before use) and answer errors while it is down: MLflow 503 (its client retries, 7 times by default), Prefect
  500 (its client retries 429/502/503 only: :data:`CLIENT_SETTINGS` adds 500). What still fails reaches the
  flows' retry condition (:func:`flows.pipeline.is_transient`).
* The object store down: :mod:`mapex_core.remote_errors` names the remote and makes the error transient.
"""

from __future__ import annotations

from datetime import timedelta
from typing import Any

from mapex_core.errors import MapexError

HEARTBEAT_S = 30  # Prefect's minimum; its default is 180 s
MISSED_HEARTBEATS = 3  # a run is CRASHED after this many heartbeat periods without one (90 s)
WATCHED_TAG = "mapex"  # the tag of the deployments `mapex deploy` registers
CRASH_AUTOMATION = "mapex: crash flow runs whose heartbeats stopped"
# What every client of the cluster (workers, and whoever sources .cluster/env) sets. The Prefect server answers
# 500 (not 503) while its database refuses connections (an OSError is not among the errors it maps to 503).
CLIENT_SETTINGS = {"PREFECT_FLOWS_HEARTBEAT_FREQUENCY": str(HEARTBEAT_S), "PREFECT_CLIENT_RETRY_EXTRA_CODES": "500"}


class CrashDetectionError(MapexError, RuntimeError):
    """The Prefect server refused the crash-detection automation (the message names the server and why)."""


def crash_automation(tag: str = WATCHED_TAG, heartbeat_s: int = HEARTBEAT_S,
                     missed: int = MISSED_HEARTBEATS) -> Any:
    """The automation that marks a flow run tagged ``tag`` CRASHED when, after one of its heartbeats, no other
    event of it (a heartbeat or a state change) came within ``missed * heartbeat_s`` seconds.

    Returns:
        A ``prefect.events.schemas.automations.AutomationCore`` (not yet created on a server).
    """
    from prefect.client.schemas.objects import StateType
    from prefect.events.actions import ChangeFlowRunState
    from prefect.events.schemas.automations import AutomationCore, EventTrigger, Posture
    from prefect.events.schemas.events import ResourceSpecification

    within = heartbeat_s * missed
    return AutomationCore(
        name=CRASH_AUTOMATION,
        description=f"Marks a flow run tagged {tag!r} CRASHED when {missed} heartbeats in a row (every {heartbeat_s} s: "
                    "PREFECT_FLOWS_HEARTBEAT_FREQUENCY on `mapex worker`) did not come: its worker died.",
        trigger=EventTrigger(
            after={"prefect.flow-run.heartbeat"},
            expect={"prefect.flow-run.*"},  # another heartbeat, or any state change (a custom state name too)
            match=ResourceSpecification({"prefect.resource.id": ["prefect.flow-run.*"]}),
            match_related=ResourceSpecification({"prefect.resource.role": "tag",
                                                 "prefect.resource.id": f"prefect.tag.{tag}"}),
            for_each={"prefect.resource.id"},
            posture=Posture.Proactive,
            threshold=1,
            within=timedelta(seconds=within),
        ),
        actions=[ChangeFlowRunState(state=StateType.CRASHED,
                                    message=f"no heartbeat for {within} s: the worker running this flow run died")],
    )


def _same(existing: Any, wanted: Any) -> bool:
    keys = {"name", "description", "enabled", "trigger", "actions", "actions_on_trigger", "actions_on_resolve"}
    return existing.model_dump(mode="json", include=keys) == wanted.model_dump(mode="json", include=keys)


def ensure_crash_detection(api_url: str | None = None, tag: str = WATCHED_TAG, heartbeat_s: int = HEARTBEAT_S,
                           missed: int = MISSED_HEARTBEATS) -> dict[str, Any]:
    """Create (or bring up to date) the automation of :func:`crash_automation` on the Prefect server; idempotent.

    Args:
        api_url: the Prefect API (default: ``PREFECT_API_URL``).
        tag: the flow runs to watch (their deployments' tag).
        heartbeat_s: the heartbeat period of the workers that run them (``PREFECT_FLOWS_HEARTBEAT_FREQUENCY``).
        missed: heartbeats missed in a row before a run is marked CRASHED.

    Returns:
        ``{"automation": name, "id": ..., "action": "created" | "updated" | "unchanged", "within_s": ...}``.

    Raises:
        ConnectionError: the Prefect server did not answer, or answered a server error (transient; names it).
        CrashDetectionError: the server refused the automation (HTTP 4xx: another Prefect version?).
    """
    import httpx
    from prefect import get_client
    from prefect.exceptions import PrefectHTTPStatusError
    from prefect.settings import PREFECT_API_URL, temporary_settings

    wanted = crash_automation(tag, heartbeat_s, missed)
    settings = {PREFECT_API_URL: api_url} if api_url else {}
    with temporary_settings(settings):
        server = PREFECT_API_URL.value()
        if not server:
            raise ConnectionError("no Prefect server: PREFECT_API_URL is not set (`source .cluster/env` first)")
        try:
            with get_client(sync_client=True) as client:
                found = client.read_automations_by_name(CRASH_AUTOMATION)
                for extra in found[1:]:  # created at the same moment by another `mapex deploy`
                    client.delete_automation(extra.id)
                if not found:
                    auto_id, action = client.create_automation(wanted), "created"
                elif _same(found[0], wanted):
                    auto_id, action = found[0].id, "unchanged"
                else:
                    auto_id, action = found[0].id, "updated"
                    client.update_automation(auto_id, wanted)
        except (httpx.HTTPError, PrefectHTTPStatusError) as exc:
            status = getattr(getattr(exc, "response", None), "status_code", None)
            kind = CrashDetectionError if status is not None and status < 500 else ConnectionError
            raise kind(f"Prefect server {server}: automation {CRASH_AUTOMATION!r} not created "
                       f"({type(exc).__name__}: {exc})") from exc
    return {"automation": CRASH_AUTOMATION, "id": str(auto_id), "action": action, "within_s": heartbeat_s * missed}
