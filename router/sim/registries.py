"""The simulated pod's registries (extension modes, promoted modes, policies) and what it
advertises from them (Initialize, GetManifest, ListModes).

Job: the runtime's ModeRegistry and PolicyRegistry as far as the router relies on them: register,
unregister and promote extension modes; register, unregister, get and list policies.

Invariants:
- Memory only: `clear` (every start) empties them, as the runtime rebuilds them per start.
- Rejections are answered in-band (`ok=false` and the runtime's text, e.g. "mode 'X' is already
  registered"); only the read-only policy registry (`policies_dir`) and a missing policy are
  statuses. Authorization (`can_manage_mode_registry`) is checked by the caller first.
- Standard modes and the `macp.mode.*` namespace are reserved; a mode is in at most one of
  `ext_modes` and `promoted_modes`. Stored descriptors are copies of the request's.
"""

from __future__ import annotations

import grpc
from macp.v1 import core_pb2, policy_pb2

from router.sim.protocol import (
    AGENT_NOT_FOUND,
    INVALID_REQUEST,
    PROTOCOL_VERSION,
    RUNTIME_VERSION,
    STANDARD_MODES,
    UNSUPPORTED_PROTOCOL_VERSION,
    now_ms,
    status_error,
)


class Registries:
    """Extension modes, promoted modes and policies of one pod (`name`)."""

    def __init__(self, name: str, *, policies_read_only: bool) -> None:
        self.name = name
        self.policies_read_only = policies_read_only
        self.policies: dict[str, policy_pb2.PolicyDescriptor] = {}
        self.ext_modes: dict[str, core_pb2.ModeDescriptor] = {}
        self.promoted_modes: dict[str, core_pb2.ModeDescriptor] = {}

    def clear(self) -> None:
        self.policies.clear()
        self.ext_modes.clear()
        self.promoted_modes.clear()

    def check_policies_writable(self) -> None:
        if self.policies_read_only:
            raise status_error(
                grpc.StatusCode.FAILED_PRECONDITION,
                "policy registry is read-only: policies are file-loaded via MACP_POLICIES_DIR",
            )

    def initialize(self, request: core_pb2.InitializeRequest) -> core_pb2.InitializeResponse:
        if not request.supported_protocol_versions:
            raise status_error(
                grpc.StatusCode.INVALID_ARGUMENT,
                "INVALID_REQUEST: supported_protocol_versions must not be empty",
                INVALID_REQUEST,
            )
        if PROTOCOL_VERSION not in request.supported_protocol_versions:
            raise status_error(
                grpc.StatusCode.FAILED_PRECONDITION,
                "UNSUPPORTED_PROTOCOL_VERSION: no mutually supported protocol version",
                UNSUPPORTED_PROTOCOL_VERSION,
            )
        return core_pb2.InitializeResponse(
            selected_protocol_version=PROTOCOL_VERSION,
            runtime_info=core_pb2.RuntimeInfo(
                name=self.name,
                title="MACP simulated runtime",
                version=RUNTIME_VERSION,
                description="In-memory MACP runtime simulator (macp-router tests)",
            ),
            capabilities=core_pb2.Capabilities(
                sessions=core_pb2.SessionsCapability(
                    stream=True, list_sessions=True, watch_sessions=True
                ),
                cancellation=core_pb2.CancellationCapability(cancel_session=True),
                progress=core_pb2.ProgressCapability(progress=True),
                manifest=core_pb2.ManifestCapability(get_manifest=True),
                mode_registry=core_pb2.ModeRegistryCapability(list_modes=True, list_changed=False),
                roots=core_pb2.RootsCapability(list_roots=True, list_changed=False),
                policy_registry=policy_pb2.PolicyRegistryCapability(
                    register_policy=not self.policies_read_only,
                    list_policies=True,
                    list_changed=False,
                    what_if_replay=False,
                ),
                decision_receipt=core_pb2.DecisionReceiptCapability(
                    get_decision_receipt=False, signed=False
                ),
                experimental=core_pb2.ExperimentalCapabilities(
                    features={"ext_mode_lifecycle": "true"}
                ),
            ),
            supported_modes=self.supported_modes(),
            instructions="Authenticate requests with Authorization: Bearer <token>.",
        )

    def supported_modes(self) -> list[str]:
        return [*STANDARD_MODES, *self.ext_modes, *self.promoted_modes]

    def mode_descriptors(self) -> list[core_pb2.ModeDescriptor]:
        out = [
            core_pb2.ModeDescriptor(
                mode=mode,
                mode_version="1.0.0",
                title=mode,
                message_types=types,
                terminal_message_types=terminal,
            )
            for mode, (types, terminal) in STANDARD_MODES.items()
        ]
        out.extend(self.promoted_modes.values())
        return out

    def get_manifest(self, request: core_pb2.GetManifestRequest) -> core_pb2.GetManifestResponse:
        if request.agent_id and request.agent_id not in (self.name, "macp-runtime"):
            raise status_error(
                grpc.StatusCode.NOT_FOUND, f"Agent '{request.agent_id}' not found", AGENT_NOT_FOUND
            )
        return core_pb2.GetManifestResponse(
            manifest=core_pb2.AgentManifest(
                agent_id=self.name,
                title="MACP simulated runtime",
                description="In-memory MACP runtime simulator",
                supported_modes=self.supported_modes(),
                input_content_types=["application/macp-envelope+proto"],
                output_content_types=["application/macp-envelope+proto"],
            )
        )

    def register_ext_mode(self, desc: core_pb2.ModeDescriptor) -> core_pb2.RegisterExtModeResponse:
        if not desc.mode:
            return core_pb2.RegisterExtModeResponse(ok=False, error="mode must not be empty")
        if desc.mode in STANDARD_MODES or desc.mode.startswith("macp.mode."):
            return core_pb2.RegisterExtModeResponse(
                ok=False, error=f"mode '{desc.mode}' is reserved"
            )
        if "Commitment" not in desc.terminal_message_types:
            return core_pb2.RegisterExtModeResponse(
                ok=False, error="terminal_message_types must include Commitment"
            )
        if desc.mode in self.ext_modes or desc.mode in self.promoted_modes:
            return core_pb2.RegisterExtModeResponse(
                ok=False, error=f"mode '{desc.mode}' is already registered"
            )
        self.ext_modes[desc.mode] = core_pb2.ModeDescriptor()
        self.ext_modes[desc.mode].CopyFrom(desc)
        return core_pb2.RegisterExtModeResponse(ok=True)

    def unregister_ext_mode(self, mode: str) -> core_pb2.UnregisterExtModeResponse:
        if self.ext_modes.pop(mode, None) is None:
            return core_pb2.UnregisterExtModeResponse(
                ok=False, error=f"extension mode '{mode}' not registered"
            )
        return core_pb2.UnregisterExtModeResponse(ok=True)

    def promote_mode(self, mode: str, promoted: str) -> core_pb2.PromoteModeResponse:
        desc = self.ext_modes.get(mode)
        if desc is None:
            return core_pb2.PromoteModeResponse(
                ok=False, error=f"extension mode '{mode}' not registered"
            )
        new_name = promoted or mode
        if new_name.startswith("macp.mode."):
            return core_pb2.PromoteModeResponse(
                ok=False, error="cannot promote into the reserved macp.mode.* namespace"
            )
        del self.ext_modes[mode]
        promoted_desc = core_pb2.ModeDescriptor()
        promoted_desc.CopyFrom(desc)
        promoted_desc.mode = new_name
        self.promoted_modes[new_name] = promoted_desc
        return core_pb2.PromoteModeResponse(ok=True, mode=new_name)

    def register_policy(
        self, desc: policy_pb2.PolicyDescriptor
    ) -> policy_pb2.RegisterPolicyResponse:
        if not desc.policy_id:
            return policy_pb2.RegisterPolicyResponse(ok=False, error="policy_id must not be empty")
        if desc.policy_id in self.policies:
            return policy_pb2.RegisterPolicyResponse(
                ok=False, error=f"policy '{desc.policy_id}' is already registered"
            )
        stored = policy_pb2.PolicyDescriptor()
        stored.CopyFrom(desc)
        if not stored.registered_at_unix_ms:
            stored.registered_at_unix_ms = now_ms()
        self.policies[desc.policy_id] = stored
        return policy_pb2.RegisterPolicyResponse(ok=True)

    def unregister_policy(self, policy_id: str) -> policy_pb2.UnregisterPolicyResponse:
        if self.policies.pop(policy_id, None) is None:
            return policy_pb2.UnregisterPolicyResponse(
                ok=False, error=f"Policy '{policy_id}' not found"
            )
        return policy_pb2.UnregisterPolicyResponse(ok=True)

    def get_policy(self, policy_id: str) -> policy_pb2.GetPolicyResponse:
        desc = self.policies.get(policy_id)
        if desc is None:
            raise status_error(
                grpc.StatusCode.NOT_FOUND,
                f"Policy '{policy_id}' not found",
                "UNKNOWN_POLICY_VERSION",
            )
        return policy_pb2.GetPolicyResponse(policy_descriptor=desc)

    def list_policies(self, mode: str) -> policy_pb2.ListPoliciesResponse:
        descs = [d for d in self.policies.values() if not mode or d.mode == mode]
        return policy_pb2.ListPoliciesResponse(descriptors=descs)
