"""What the preflight report says about a deployment of several replicas or ranks. Pure."""

from __future__ import annotations

from qwen3_vl_service.core.findings import Finding
from qwen3_vl_service.core.hosts import is_loopback
from qwen3_vl_service.deployment.cluster import Layout, Replica
from qwen3_vl_service.planning.plan import Plan
from qwen3_vl_service.settings.config import ServiceConfig


def where(replica: Replica) -> str:
    """A replica's GPUs, or on the CPU build its cores."""
    if replica.gpus:
        return f"GPUs {','.join(replica.gpus)}"
    return f"CPU cores {','.join(map(str, replica.cpus))}" if replica.cpus else "CPU"


def findings(cfg: ServiceConfig, lay: Layout, plan: Plan | None) -> list[Finding]:
    """Report lines for the replicas: where each runs, capacity per replica and in total."""
    out: list[Finding] = []
    tp = lay.tensor_parallel_size
    nodes = len(lay.nodes)
    if lay.mode == "router":
        out.append(
            Finding(
                "ok",
                "Replicas",
                f"{lay.total} replicas behind vllm-router ({cfg.router_policy}) on port {cfg.router_port} "
                f"of {lay.head or 'this node'}: {nodes} node(s) x {lay.per_node} replica(s) x TP {tp}",
            )
        )
        for r in lay.replicas:
            node = r.node or "this node"
            out.append(Finding("ok", "Replicas", f"{r.name} on {node}: {where(r)}, port {r.port}"))
        if nodes > 1 and is_loopback(cfg.host) and not cfg.api_key:
            out.append(
                Finding(
                    "warn",
                    "Replicas",
                    f"HOST={cfg.host}: the router and the head's API stay on loopback, but each replica "
                    "listens on its node's address so that the router reaches it, open to the network "
                    "without API_KEY",
                    "set API_KEY (the router passes the client's key on to the replicas)",
                )
            )
    else:
        out.append(
            Finding(
                "ok",
                "Replicas",
                f"data parallel: {lay.total} ranks over {nodes} node(s) ({lay.per_node} per node x TP {tp}, "
                f"{lay.total * tp} GPUs); head {lay.head or 'this node'}, "
                f"rpc port {cfg.data_parallel_rpc_port}; "
                "the MoE layers exchange tokens between ranks: needs a fast fabric, ranks share fate",
            )
        )
    if plan is not None and plan.has_capacity:
        per = plan.max_concurrency or 0
        kv = plan.kv_tokens or 0
        seqs = plan.max_num_seqs or cfg.max_num_seqs  # MAX_NUM_SEQS=auto: the plan's number
        shown = f"auto: {seqs}" if not cfg.max_num_seqs else str(seqs)
        out.append(
            Finding(
                "ok",
                "Capacity",
                f"per {'replica' if lay.mode == 'router' else 'rank'}: {kv:,} KV tokens, {per} "
                f"full-length sequences, MAX_NUM_SEQS={shown}; in total ({lay.total}): "
                f"{kv * lay.total:,} KV tokens, {per * lay.total} full-length sequences, "
                f"up to {seqs * lay.total} requests decoded at once",
            )
        )
    return out


__all__ = ["findings", "where"]
