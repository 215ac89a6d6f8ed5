/**
 * An audit log entry as a FHIR R4 AuditEvent, shaped after IHE Basic Audit Log Patterns (BALP,
 * https://profiles.ihe.net/ITI/BALP/): RESTful interactions are type `rest` with the interaction as
 * subtype, searches DICOM 110112 "Query" with the query (when opened) in a Query entity, authentication
 * DICOM 110114, reads of the audit log DICOM 110101 "Audit Log Used"; agents are the client (source
 * role), the user when there is one, and this server (destination role); the observer is this server;
 * entities are the patients named and the record touched.
 *
 * The AuditEvent id is the entry's sequence number in the log: `AuditEvent/42` is leaf 42 of the
 * Merkle tree, which `custos audit prove --seq 42` proves. The event's own UUID is an extension.
 * @module
 */
import type { AuditAction, AuditEvent } from './audit-event.ts';
import type { SensitiveFields } from './audit-sealer.ts';
import { isResourceType } from '../fhir/resource-types.ts';

const DCM = 'http://dicom.nema.org/resources/ontology/DCM';
const EVENT_TYPE = 'http://terminology.hl7.org/CodeSystem/audit-event-type';
const REST = 'http://hl7.org/fhir/restful-interaction';
const PURPOSE = 'http://terminology.hl7.org/CodeSystem/v3-ActReason';
const ENTITY_TYPE = 'http://terminology.hl7.org/CodeSystem/audit-entity-type';
const OBJECT_ROLE = 'http://terminology.hl7.org/CodeSystem/object-role';
const SOURCE_TYPE = 'http://terminology.hl7.org/CodeSystem/security-source-type';
const PARTICIPATION = 'http://terminology.hl7.org/CodeSystem/v3-ParticipationType';
/** Our action names, as a subtype next to the standard one (lossless round trip). */
export const CUSTOS_ACTION_SYSTEM = 'urn:custos:audit-action';
export const EVENT_ID_EXTENSION = 'urn:custos:audit-event-id';
export const PHASE_EXTENSION = 'urn:custos:audit-phase';

/** FHIR AuditEvent.action (http://hl7.org/fhir/audit-event-action) of each of our actions. */
export const FHIR_ACTION: Readonly<Record<AuditAction, 'C' | 'R' | 'U' | 'D' | 'E'>> = {
  create: 'C',
  read: 'R',
  vread: 'R',
  history: 'R',
  update: 'U',
  patch: 'U',
  delete: 'D',
  search: 'E',
  batch: 'E',
  transaction: 'E',
  authenticate: 'E',
  admin: 'E',
  key: 'E',
  'audit-read': 'E',
  egress: 'E',
};

/** FHIR AuditEvent.outcome (http://hl7.org/fhir/audit-event-outcome) of each of our outcomes. */
export const FHIR_OUTCOME: Readonly<Record<string, '0' | '4' | '8' | undefined>> = {
  success: '0',
  refused: '4',
  failed: '8',
  pending: undefined,
};

type Coding = { system: string; code: string; display?: string };

function typeOf(e: AuditEvent): { type: Coding; subtype: Coding[] } {
  const ours: Coding = { system: CUSTOS_ACTION_SYSTEM, code: e.action };
  const rest = (code: string): Coding => ({ system: REST, code });
  switch (e.action) {
    case 'search':
      return {
        type: { system: DCM, code: '110112', display: 'Query' },
        subtype: [rest(e.resource?.type ? 'search-type' : 'search-system'), ours],
      };
    case 'history':
      return {
        type: { system: EVENT_TYPE, code: 'rest', display: 'Restful Operation' },
        subtype: [
          rest(e.resource?.id ? 'history-instance' : e.resource?.type ? 'history-type' : 'history-system'),
          ours,
        ],
      };
    case 'create':
    case 'read':
    case 'vread':
    case 'update':
    case 'patch':
    case 'delete':
    case 'batch':
    case 'transaction':
      return {
        type: { system: EVENT_TYPE, code: 'rest', display: 'Restful Operation' },
        subtype: [rest(e.action), ours],
      };
    case 'authenticate':
      return { type: { system: DCM, code: '110114', display: 'User Authentication' }, subtype: [ours] };
    case 'audit-read':
      return { type: { system: DCM, code: '110101', display: 'Audit Log Used' }, subtype: [ours] };
    default:
      return { type: { system: DCM, code: '110100', display: 'Application Activity' }, subtype: [ours] };
  }
}

export interface AuditEventResourceOptions {
  /** The FHIR base URL of this server: the observer, and the destination agent. */
  observer: string;
  /** Registered client names, by client id, where known. */
  clientNames?: ReadonlyMap<string, string>;
  /** The event's sealed fields, opened: only for readers allowed to see them. */
  opened?: SensitiveFields;
}

/** The FHIR R4 AuditEvent of log entry `seq` (see the module comment). */
export function auditEventResource(
  seq: number,
  e: AuditEvent,
  opts: AuditEventResourceOptions,
): Record<string, unknown> {
  const { type, subtype } = typeOf(e);
  const purposeOfUse = e.purpose ? [{ coding: [{ system: PURPOSE, code: e.purpose }] }] : undefined;
  const host = hostOf(opts.observer);
  const clientId = e.actor?.clientId;
  const userId = e.actor?.userId;
  const roles = Array.isArray(e.actor?.roles) ? e.actor.roles : [];
  const agent: Record<string, unknown>[] = [
    {
      type: { coding: [{ system: DCM, code: '110153', display: 'Source Role ID' }] },
      role: roles.length > 0 ? roles.map((r) => ({ text: r })) : undefined,
      who: clientId
        ? {
            identifier: { system: 'urn:custos:client', value: clientId },
            display: opts.clientNames?.get(clientId),
          }
        : undefined,
      requestor: !userId,
      network: e.source?.ip ? { address: e.source.ip, type: '2' } : undefined,
      purposeOfUse: userId ? undefined : purposeOfUse,
    },
  ];
  if (userId)
    agent.push({
      type: { coding: [{ system: PARTICIPATION, code: 'IRCP', display: 'information recipient' }] },
      who: { identifier: { system: 'urn:custos:user', value: userId } },
      requestor: true,
      purposeOfUse,
    });
  agent.push({
    type: { coding: [{ system: DCM, code: '110152', display: 'Destination Role ID' }] },
    who: { identifier: { system: 'urn:ietf:rfc:3986', value: opts.observer }, display: 'Custos' },
    requestor: false,
    network: host ? { address: host, type: '1' } : undefined,
  });

  const entity: Record<string, unknown>[] = [];
  for (const p of Array.isArray(e.patients) ? e.patients : [])
    entity.push({
      what: { reference: `Patient/${p}` },
      type: { system: ENTITY_TYPE, code: '1', display: 'Person' },
      role: { system: OBJECT_ROLE, code: '1', display: 'Patient' },
    });
  const r = e.resource;
  if (r?.type) {
    const fhir = isResourceType(r.type);
    entity.push({
      what:
        r.id && fhir
          ? { reference: `${r.type}/${r.id}${r.version ? `/_history/${r.version}` : ''}` }
          : r.id
            ? { identifier: { system: `urn:custos:${r.type}`, value: r.id } }
            : { type: r.type },
      type: { system: ENTITY_TYPE, code: '2', display: 'System Object' },
      role: fhir ? { system: OBJECT_ROLE, code: '4', display: 'Domain Resource' } : undefined,
    });
  }
  // The request: its id (shared by a write's attempt and outcome), what it returned, and for readers
  // allowed to open them, the sealed fields (BALP puts a search's query here, base64).
  const o = opts.opened;
  const detail: { type: string; valueString: string }[] = [];
  if (e.count !== undefined) detail.push({ type: 'count', valueString: String(e.count) });
  if (o?.breakGlassReason) detail.push({ type: 'break-glass-reason', valueString: o.breakGlassReason });
  if (o?.userAgent) detail.push({ type: 'user-agent', valueString: o.userAgent });
  if (o?.truncated?.length) detail.push({ type: 'truncated', valueString: o.truncated.join(',') });
  if (e.sealed && !o)
    detail.push({ type: 'sealed', valueString: 'present; not opened for this purpose of use' });
  entity.push({
    what: { identifier: { system: 'urn:custos:request-id', value: e.requestId } },
    type: { system: ENTITY_TYPE, code: '2', display: 'System Object' },
    role: o?.query ? { system: OBJECT_ROLE, code: '24', display: 'Query' } : undefined,
    query: o?.query ? Buffer.from(o.query, 'utf8').toString('base64') : undefined,
    detail: detail.length > 0 ? detail : undefined,
  });

  const outcome = FHIR_OUTCOME[e.outcome];
  return prune({
    resourceType: 'AuditEvent',
    id: String(seq),
    extension: [
      { url: EVENT_ID_EXTENSION, valueString: e.id },
      { url: PHASE_EXTENSION, valueCode: e.phase },
    ],
    type,
    subtype,
    action: FHIR_ACTION[e.action] ?? 'E',
    recorded: e.time,
    outcome,
    outcomeDesc: e.code ?? (e.outcome === 'pending' ? 'attempt: outcome pending' : undefined),
    purposeOfEvent: purposeOfUse,
    agent,
    source: {
      site: host,
      observer: { identifier: { system: 'urn:ietf:rfc:3986', value: opts.observer }, display: 'Custos' },
      type: [{ system: SOURCE_TYPE, code: '4', display: 'Application Server' }],
    },
    entity,
  }) as Record<string, unknown>;
}

function hostOf(url: string): string | undefined {
  try {
    return new URL(url).host || undefined;
  } catch {
    return undefined;
  }
}

/** Drops undefined members (and arrays left empty), recursively. */
function prune(v: unknown): unknown {
  if (Array.isArray(v)) return v.map(prune);
  if (v === null || typeof v !== 'object') return v;
  const out: Record<string, unknown> = {};
  for (const [k, x] of Object.entries(v)) {
    if (x === undefined) continue;
    out[k] = prune(x);
  }
  return out;
}
