import { createHash, randomUUID } from 'node:crypto';

/**
 * The audit event model, version 1 (IHE BALP in spirit: who, what record, why, outcome).
 *
 * An event names records by identifiers, never by content. Fields that could carry PHI (a search
 * query, a break-glass reason, a user agent) are only ever stored sealed, in `sealed`, under the
 * audit field key that auditors' reads open (audit-sealer.ts, docs/audit.md). The stored bytes are `encodeAuditEvent(event)`, and the Merkle leaf hash
 * is computed over exactly those bytes (RFC 6962 §2.1: SHA-256(0x00 || entry)).
 */
export interface AuditEvent {
  /** Encoding version. */
  v: 1;
  /** Unique event id (UUID). */
  id: string;
  /** ISO 8601 instant at which the event was recorded. */
  time: string;
  /** `attempt`: a write is about to be committed; `outcome`: that write's result; `access`: a
   * read-side event (read, search, history, refusal) recorded before any data leaves. */
  phase: 'attempt' | 'outcome' | 'access';
  action: AuditAction;
  outcome: 'pending' | 'success' | 'refused' | 'failed';
  /** Error code from the catalog when not a success. */
  code?: string;
  /** Request id shared by the attempt and the outcome of one write. */
  requestId: string;
  projectId?: string;
  actor: { clientId?: string; userId?: string; roles?: string[] };
  purpose?: string;
  resource?: { type: string; id?: string; version?: string };
  /** Ids of the patients whose compartment the touched records belong to. */
  patients?: string[];
  /** Count of entries returned (history, batch). */
  count?: number;
  source: { ip?: string };
  /**
   * What an auditor needs that could hold PHI (search query, break-glass reason, user agent),
   * AES-256-GCM under the audit field key with the event id as associated data:
   * `v1.<nonce>.<ciphertext and tag>` (base64url). Never present in clear. See audit-sealer.ts.
   */
  sealed?: string;
  /**
   * Action `egress`: where an outbound request went (host and port, never a path or query), the
   * vendor and endpoint it matched, the class of data it carried and why (src/egress/egress.ts).
   */
  egress?: {
    vendorId?: string;
    endpointId?: string;
    host: string;
    port: number;
    dataClass: string;
    purpose: string;
    /** 0 for the first request, n for the n-th redirect followed. */
    hop: number;
    /** Where the vendor passes the data on: an e-mail recipient's domain (never the mailbox). */
    recipient?: string;
  };
}

export type AuditAction =
  | 'create'
  | 'read'
  | 'vread'
  | 'update'
  | 'patch'
  | 'delete'
  | 'history'
  | 'search'
  | 'batch'
  | 'transaction'
  | 'authenticate'
  | 'admin'
  /** Key access log: every unwrap of a data key from the key provider (issue 5). */
  | 'key'
  /** A read of the audit log itself: an AuditEvent search or read, a report (docs/audit.md). */
  | 'audit-read'
  /** An outbound connection attempt through the egress gateway, allowed or refused (src/egress). */
  | 'egress';

/**
 * A successful administrative action (`action: admin`): what the CLI and admin API do to clients,
 * projects, keys and indexes. `code` names the action (`client.created`, `key.rotated`, …).
 */
export function adminEvent(
  code: string,
  opts: {
    requestId: string;
    projectId?: string;
    userId?: string;
    resource?: { type: string; id?: string };
    count?: number;
  },
): AuditEvent {
  return {
    v: 1,
    id: randomUUID(),
    time: new Date().toISOString(),
    phase: 'access',
    action: 'admin',
    outcome: 'success',
    code,
    requestId: opts.requestId,
    projectId: opts.projectId,
    actor: { userId: opts.userId, roles: ['installation-admin'] },
    resource: opts.resource,
    count: opts.count,
    source: {},
  };
}

/** Deterministic JSON: object keys sorted, no whitespace, undefined dropped. */
export function canonicalJson(value: unknown): string {
  if (value === null || typeof value !== 'object') return JSON.stringify(value);
  if (Array.isArray(value))
    return `[${value.map((v) => canonicalJson(v === undefined ? null : v)).join(',')}]`;
  const keys = Object.keys(value as object)
    .filter((k) => (value as Record<string, unknown>)[k] !== undefined)
    .sort();
  return `{${keys.map((k) => `${JSON.stringify(k)}:${canonicalJson((value as Record<string, unknown>)[k])}`).join(',')}}`;
}

export function encodeAuditEvent(e: AuditEvent): Buffer {
  return Buffer.from(canonicalJson(e), 'utf8');
}

/** RFC 6962 §2.1 leaf hash: SHA-256(0x00 || entry). */
export function leafHash(entry: Uint8Array): Buffer {
  return createHash('sha256')
    .update(Buffer.from([0]))
    .update(entry)
    .digest();
}
