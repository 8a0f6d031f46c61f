"""Federated adaptation across sites on Flower (issue 17): a hub and a client per site.

Flower pins older fastapi, typer and protobuf than the service, so the hub (`hub`) and the
sites' clients (`site_client`) run in an environment of their own, `.venv-fed` (`make
federation`), started by `evergreen federate hub|site` (`launch`). A site's client is a bridge:
it holds no model and no tickets, it forwards the hub's instructions to its site's service
(`/v1/federation`, `service.federated_site`), which stays the only writer of its buffer and
registry. What crosses between sites and hub: adapter weights, example counts, ε spent and
per-probe gate results (`learners.federated.SiteScores`), each signed with the site's key (`wire`).
"""
