"""Failure notifications: the automations declared in ``prefect-automations.yaml``, created
on the Prefect server with a notification block (``lcm alerts``).

One command, idempotent: the block ``lcm-alerts`` (a Slack or Microsoft Teams incoming
webhook, or any URL that takes a JSON POST) is saved, overwriting an earlier one, and each
automation of the file is created with that block, replacing any automation of the same name.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import yaml

from lcm.errors import ConfigError

BLOCK_NAME = "lcm-alerts"
SPEC = Path(__file__).resolve().parent.parent / "prefect-automations.yaml"
Kind = Literal["webhook", "slack", "teams"]


def notification_block(url: str, kind: Kind) -> Any:
    from prefect.blocks.notifications import (
        CustomWebhookNotificationBlock,
        MicrosoftTeamsWebhook,
        SlackWebhook,
    )

    if not url.startswith(("http://", "https://")):
        raise ConfigError(f"--url {url!r}: expected an http(s) URL")
    if kind == "slack":
        return SlackWebhook(url=url)
    if kind == "teams":
        return MicrosoftTeamsWebhook(url=url)
    if kind == "webhook":
        return CustomWebhookNotificationBlock(
            name=BLOCK_NAME, url=url, json_data={"subject": "{{subject}}", "text": "{{body}}"}
        )
    raise ConfigError(f"--kind {kind!r}: expected webhook, slack or teams")


def automation_specs(block_id: str, spec: Path = SPEC) -> list[dict[str, Any]]:
    """The file's automations with the block's id filled in."""
    try:
        doc = yaml.safe_load(spec.read_text())
    except (OSError, yaml.YAMLError) as e:
        raise ConfigError(f"{spec}: cannot read the automations ({e})") from e
    specs = (doc or {}).get("automations")
    if not specs:
        raise ConfigError(f"{spec}: no automations declared")
    for automation in specs:
        for action in automation.get("actions", []):
            if action.get("block_document_id") == "{{ block_document_id }}":
                action["block_document_id"] = block_id
    return specs


def install_alerts(url: str, kind: Kind = "webhook", spec: Path = SPEC) -> list[str]:
    """Save the notification block and create (or replace) the automations; returns their
    names. Needs PREFECT_API_URL (a server: automations run there)."""
    from prefect.automations import Automation

    from flows.deploy import api_url

    api_url()
    block = notification_block(url, kind)
    block_id = block.save(BLOCK_NAME, overwrite=True)
    names = []
    for raw in automation_specs(str(block_id), spec):
        automation = Automation.model_validate(raw)
        try:
            old = Automation.read(name=automation.name)
        except ValueError:
            old = None
        if old is not None:
            old.delete()
        automation.create()
        names.append(automation.name)
    return names
