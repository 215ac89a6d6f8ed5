import { createHash } from 'node:crypto';

/**
 * The audit event model, version 1 (IHE BALP in spirit: who, what record, why, outcome).
 *
 * An event names records by identifiers, never by content. Fields that could carry PHI (a search
 * query, a break-glass reason, a user agent) are not in v1: the audit issue adds them encrypted
 * under an auditor key. The stored bytes are `encodeAuditEvent(event)`, and the Merkle leaf hash
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
  | 'key';

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
