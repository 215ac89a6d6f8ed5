import { newId } from '../kernel/ids.ts';
import { CustosError, type IssueDetail } from '../kernel/errors.ts';
import type { SqlDriver } from '../store/sql-driver.ts';
import type { AuditLog } from '../audit/audit-log.ts';
import { adminEvent } from '../audit/audit-event.ts';
import type { Logger } from '../log/logger.ts';
import { addressKind, normalizeHost } from './address-policy.ts';
import { fieldIssue, shortLabel } from '../kernel/validation.ts';

/**
 * The vendor registry (issue 7, docs/phi-boundary.md): every party Custos may send data to, its
 * endpoints (host, port, protocol), its Business Associate Agreement (executed or not, expiry date,
 * the signed document's SHA-256) and the class of data it may receive. The egress gateway
 * (egress.ts) sends nothing to a destination that is not an endpoint here.
 *
 * Two sources: vendors registered by an administrator (`custos vendor …`, `/admin/vendors`; rows in
 * the resource database, migration 8, every change audited as an admin action in the same
 * transaction), and infrastructure destinations that the operator configured through the
 * environment (KMS, SIEM, checkpoint witnesses), which exist for as long as the configuration names
 * them (infrastructure.ts, ADR 0009).
 *
 * @example
 * const v = await registry.addVendor({ name: 'Example Notify', services: ['webhooks'], phiClass: 'full' });
 * await registry.addEndpoint({ vendor: v.vendorId, host: 'hooks.example.com', port: 443, protocol: 'https' });
 * await registry.recordBaa({ vendor: v.vendorId, executedAt: '2025-01-15', expiresOn: '2027-01-15',
 *   documentSha256: sha256Hex(pdf) });
 */

/** Classes of data, least to most sensitive. `limited`: a HIPAA limited data set (164.514(e)). */
export const DATA_CLASSES = ['none', 'deidentified', 'limited', 'full'] as const;
export type DataClass = (typeof DATA_CLASSES)[number];

/** Whether `c` is PHI (needs an executed, unexpired BAA with the receiving vendor). */
export function isPhiClass(c: DataClass): boolean {
  return c === 'full' || c === 'limited';
}

/** `a` is no more sensitive than `b`. */
export function classWithin(a: DataClass, b: DataClass): boolean {
  return DATA_CLASSES.indexOf(a) <= DATA_CLASSES.indexOf(b);
}

/** `https` (HTTP over TLS), `tls` (a raw TLS stream: syslog, SMTP over TLS), `http` (loopback or
 * private test servers only: needs `allowPrivate`). */
export const ENDPOINT_PROTOCOLS = ['https', 'tls', 'http'] as const;
export type EndpointProtocol = (typeof ENDPOINT_PROTOCOLS)[number];

/** A BAA warns this many days ahead of its expiry. */
export const BAA_WARNING_DAYS = 30;

export interface VendorEndpoint {
  endpointId: string;
  host: string;
  port: number;
  protocol: EndpointProtocol;
  /** Private, loopback and link-local addresses allowed for exactly this host and port. */
  allowPrivate: boolean;
}

export interface VendorBaa {
  baaId: string;
  executed: boolean;
  /** When it was signed (`YYYY-MM-DD`), for an executed BAA. */
  executedAt?: string;
  /** `YYYY-MM-DD`: the BAA no longer covers anything from 00:00 UTC of this day on. */
  expiresOn?: string;
  documentSha256?: string;
  recordedBy: string;
  recordedAt: string;
}

/**
 * `active`: executed and more than 30 days from expiry; `expiring`: executed, expires within 30
 * days (a warning; still active); `expired`: blocked; `not-executed` and `none`: no PHI.
 */
export type BaaState = 'active' | 'expiring' | 'expired' | 'not-executed' | 'none';

export interface Vendor {
  vendorId: string;
  name: string;
  /** `vendor`: registered by an administrator; `infrastructure`: configured by the operator
   * (environment), read-only here; `self`: this installation's own admin API (the CLI). */
  kind: 'vendor' | 'infrastructure' | 'self';
  services: string[];
  /** The most sensitive class of data it may receive. */
  phiClass: DataClass;
  endpoints: VendorEndpoint[];
  baa?: VendorBaa;
  baaState: BaaState;
  /** Days until the BAA expires (negative: expired that many days ago); absent without one. */
  expiresInDays?: number;
  /** Infrastructure: the environment variable that configures it. */
  configuredBy?: string;
  createdAt?: string;
}

/** One endpoint with what the gateway needs to know of its vendor. */
export interface Destination extends VendorEndpoint {
  vendorId: string;
  vendorName: string;
  kind: Vendor['kind'];
  phiClass: DataClass;
  baaState: BaaState;
  expiresInDays?: number;
}

/** Where the gateway looks destinations up. */
export interface DestinationSource {
  find(host: string, port: number): Promise<Destination | undefined>;
}

/** The key of a destination: its normalized host and its port. */
export function destinationKey(host: string, port: number): string {
  return `${host}|${port}`;
}

/**
 * Every endpoint of `vendors`, by host and port: the destinations the egress gateway may connect
 * to (its `find` looks them up here) and, the same map, the egress allowlist of the flow map
 * (flow-map.ts). One function for both, so the allowlist cannot name a destination the gateway
 * refuses, nor miss one it allows.
 */
export function destinationIndex(vendors: readonly Vendor[]): Map<string, Destination> {
  const byKey = new Map<string, Destination>();
  for (const v of vendors) for (const d of destinationsOf(v)) byKey.set(destinationKey(d.host, d.port), d);
  return byKey;
}

/**
 * Why the gateway refuses to send data of class `dataClass` to `d` (its class and BAA rules), or
 * undefined when it may: above the vendor's class; PHI (`full`, `limited`) to a registered vendor
 * whose BAA has expired, or that has none executed. The gateway (egress.ts) and the flow map
 * (flow-map.ts, "covered") both ask this function.
 */
export function classRefusal(
  d: Pick<Destination, 'phiClass' | 'kind' | 'baaState'>,
  dataClass: DataClass,
): 'EGRESS_CLASS_NOT_ALLOWED' | 'EGRESS_BAA_EXPIRED' | 'EGRESS_BAA_INACTIVE' | undefined {
  if (!classWithin(dataClass, d.phiClass)) return 'EGRESS_CLASS_NOT_ALLOWED';
  if (isPhiClass(dataClass) && d.kind === 'vendor') {
    if (d.baaState === 'expired') return 'EGRESS_BAA_EXPIRED';
    if (d.baaState !== 'active' && d.baaState !== 'expiring') return 'EGRESS_BAA_INACTIVE';
  }
  return undefined;
}

/** The most sensitive class the gateway sends to `d` today (classRefusal). */
export function classAllowedNow(d: Pick<Destination, 'phiClass' | 'kind' | 'baaState'>): DataClass {
  return [...DATA_CLASSES].reverse().find((c) => classRefusal(d, c) === undefined) ?? 'none';
}

/** A fixed list of vendors (infrastructure destinations, the CLI's `self`). */
export class StaticDestinations implements DestinationSource {
  readonly #byKey: Map<string, Destination>;
  constructor(readonly vendors: readonly Vendor[]) {
    this.#byKey = destinationIndex(vendors);
  }
  async find(host: string, port: number): Promise<Destination | undefined> {
    return this.#byKey.get(destinationKey(host, port));
  }
}

export function destinationsOf(v: Vendor): Destination[] {
  return v.endpoints.map((e) => ({
    ...e,
    vendorId: v.vendorId,
    vendorName: v.name,
    kind: v.kind,
    phiClass: v.phiClass,
    baaState: v.baaState,
    expiresInDays: v.expiresInDays,
  }));
}

/** The state of a BAA at `now`. */
export function baaStateOf(
  baa: VendorBaa | undefined,
  now: Date,
): { baaState: BaaState; expiresInDays?: number } {
  if (!baa) return { baaState: 'none' };
  if (!baa.executed || !baa.expiresOn) return { baaState: 'not-executed' };
  const [y, m, d] = baa.expiresOn.split('-').map(Number) as [number, number, number];
  const expiresInDays = Math.ceil((Date.UTC(y, m - 1, d) - now.getTime()) / 86_400_000) || 0;
  if (expiresInDays <= 0) return { baaState: 'expired', expiresInDays };
  return { baaState: expiresInDays <= BAA_WARNING_DAYS ? 'expiring' : 'active', expiresInDays };
}

// --- validation -------------------------------------------------------------------------------

function calendarDate(v: unknown): string | undefined {
  if (typeof v !== 'string') return undefined;
  const m = /^(\d{4})-(\d{2})-(\d{2})$/.exec(v.trim());
  if (!m) return undefined;
  const [y, mo, d] = [Number(m[1]), Number(m[2]), Number(m[3])];
  const c = new Date(Date.UTC(y, mo - 1, d));
  if (c.getUTCFullYear() !== y || c.getUTCMonth() !== mo - 1 || c.getUTCDate() !== d) return undefined;
  return v.trim();
}

export interface AddVendorRequest {
  name: string;
  services?: string[];
  phiClass: DataClass;
  /** Who made the change (the CLI sends the operating-system account). */
  recordedBy?: string;
}

export interface AddEndpointRequest {
  /** The vendor's id or name. */
  vendor: string;
  host: string;
  port: number;
  protocol: EndpointProtocol;
  allowPrivate?: boolean;
  recordedBy?: string;
}

export interface RecordVendorBaaRequest {
  vendor: string;
  /** Default true. A BAA under negotiation is recorded with `executed: false` (it permits no PHI). */
  executed?: boolean;
  executedAt?: string;
  expiresOn?: string;
  documentSha256?: string;
  recordedBy?: string;
}

type Loose<T> = Partial<Record<keyof T, unknown>>;

function recordedByOf(v: unknown, issues: IssueDetail[]): string {
  if (v === undefined) return 'installation-admin';
  const s = shortLabel(v);
  if (!s) issues.push(fieldIssue('recordedBy', 'Who made the change is not a short text.'));
  return s ?? '';
}

export function validateVendor(req: Loose<AddVendorRequest>): Required<AddVendorRequest> {
  const issues: IssueDetail[] = [];
  const name = shortLabel(req.name);
  if (!name)
    issues.push(fieldIssue('name', 'The vendor name is missing, longer than 200 characters or not text.'));
  const services: string[] = [];
  if (req.services !== undefined && !Array.isArray(req.services))
    issues.push(fieldIssue('services', 'The services are not a list.'));
  for (const s of Array.isArray(req.services) ? req.services : []) {
    const v = typeof s === 'string' ? s.trim().toLowerCase() : '';
    if (!/^[a-z0-9][a-z0-9-]{0,39}$/.test(v)) {
      issues.push(fieldIssue('services', 'A service name is not 1–40 of a-z, 0-9 and hyphens.'));
      break;
    }
    if (!services.includes(v)) services.push(v);
  }
  const phiClass = typeof req.phiClass === 'string' ? req.phiClass.trim().toLowerCase() : '';
  if (!(DATA_CLASSES as readonly string[]).includes(phiClass))
    issues.push(
      fieldIssue('phiClass', `The data class must be one of ${DATA_CLASSES.join(', ')}.`, 'code-invalid'),
    );
  const recordedBy = recordedByOf(req.recordedBy, issues);
  if (issues.length) throw new CustosError('VENDOR_INVALID', issues);
  return { name: name!, services, phiClass: phiClass as DataClass, recordedBy };
}

export function validateEndpoint(req: Loose<AddEndpointRequest>): Required<AddEndpointRequest> {
  const issues: IssueDetail[] = [];
  const vendor = typeof req.vendor === 'string' && req.vendor.trim() !== '' ? req.vendor.trim() : '';
  if (!vendor) issues.push(fieldIssue('vendor', 'The vendor is missing.', 'required'));
  const host = typeof req.host === 'string' ? normalizeHost(req.host) : undefined;
  if (!host || host.length > 253)
    issues.push(fieldIssue('host', 'The host is not a DNS name or an IP address (no scheme, path or port).'));
  const port = typeof req.port === 'string' && /^\d{1,5}$/.test(req.port) ? Number(req.port) : req.port;
  if (typeof port !== 'number' || !Number.isInteger(port) || port < 1 || port > 65535)
    issues.push(fieldIssue('port', 'The port is not a whole number from 1 to 65535.'));
  const protocol = typeof req.protocol === 'string' ? req.protocol.trim().toLowerCase() : '';
  if (!(ENDPOINT_PROTOCOLS as readonly string[]).includes(protocol))
    issues.push(
      fieldIssue('protocol', `The protocol must be one of ${ENDPOINT_PROTOCOLS.join(', ')}.`, 'code-invalid'),
    );
  const allowPrivate = req.allowPrivate === true;
  if (protocol === 'http' && !allowPrivate)
    issues.push(
      fieldIssue(
        'protocol',
        'Plain http is only for a loopback or private test server registered with allowPrivate; use https.',
        'business-rule',
      ),
    );
  if (host && !allowPrivate && addressKind(host) !== undefined && addressKind(host) !== 'public')
    issues.push(
      fieldIssue(
        'host',
        'The host is a private, loopback, link-local or reserved address: register it with allowPrivate if that is intended.',
        'business-rule',
      ),
    );
  const recordedBy = recordedByOf(req.recordedBy, issues);
  if (issues.length) throw new CustosError('VENDOR_INVALID', issues);
  return {
    vendor,
    host: host!,
    port: port as number,
    protocol: protocol as EndpointProtocol,
    allowPrivate,
    recordedBy,
  };
}

export function validateVendorBaa(
  req: Loose<RecordVendorBaaRequest>,
  now: Date,
): Required<RecordVendorBaaRequest> {
  const issues: IssueDetail[] = [];
  const vendor = typeof req.vendor === 'string' && req.vendor.trim() !== '' ? req.vendor.trim() : '';
  if (!vendor) issues.push(fieldIssue('vendor', 'The vendor is missing.', 'required'));
  if (req.executed !== undefined && typeof req.executed !== 'boolean')
    issues.push(fieldIssue('executed', 'executed must be true or false.'));
  const executed = req.executed !== false;
  const latestToday = new Date(now.getTime() + 14 * 3600_000).toISOString().slice(0, 10);
  let executedAt = '';
  let expiresOn = '';
  let documentSha256 = '';
  const sha = typeof req.documentSha256 === 'string' ? req.documentSha256.trim().toLowerCase() : '';
  if (sha !== '' && !/^[0-9a-f]{64}$/.test(sha))
    issues.push(fieldIssue('documentSha256', 'The document hash is not a SHA-256 (64 hex digits).'));
  if (executed) {
    const e = calendarDate(req.executedAt);
    if (!e)
      issues.push(
        fieldIssue('executedAt', 'The execution date is missing or not a calendar date (YYYY-MM-DD).'),
      );
    else if (e > latestToday) issues.push(fieldIssue('executedAt', 'The execution date is in the future.'));
    else if (e < '1996-08-21')
      issues.push(fieldIssue('executedAt', 'The execution date is before HIPAA (1996-08-21).'));
    else executedAt = e;
    const x = calendarDate(req.expiresOn);
    if (!x)
      issues.push(
        fieldIssue(
          'expiresOn',
          'The expiry date is missing or not a calendar date (YYYY-MM-DD); an executed BAA needs one.',
        ),
      );
    else if (executedAt && x <= executedAt)
      issues.push(fieldIssue('expiresOn', 'The expiry date is not after the execution date.'));
    else expiresOn = x;
    if (sha === '')
      issues.push(fieldIssue('documentSha256', 'An executed BAA needs its document (SHA-256).', 'required'));
    else documentSha256 = sha;
  } else {
    // Not executed: dates are optional; an expiry may be recorded ahead of signature.
    if (req.executedAt !== undefined && req.executedAt !== '')
      issues.push(fieldIssue('executedAt', 'A BAA that is not executed has no execution date.'));
    if (req.expiresOn !== undefined && req.expiresOn !== '') {
      const x = calendarDate(req.expiresOn);
      if (!x) issues.push(fieldIssue('expiresOn', 'The expiry date is not a calendar date (YYYY-MM-DD).'));
      else expiresOn = x;
    }
    documentSha256 = /^[0-9a-f]{64}$/.test(sha) ? sha : '';
  }
  const recordedBy = recordedByOf(req.recordedBy, issues);
  if (issues.length) throw new CustosError('VENDOR_INVALID', issues);
  return { vendor, executed, executedAt, expiresOn, documentSha256, recordedBy };
}

// --- the registry -----------------------------------------------------------------------------

export interface VendorRegistryDeps {
  db: SqlDriver;
  audit: AuditLog;
  /** Infrastructure destinations configured by the operator (infrastructure.ts). */
  infrastructure?: readonly Vendor[];
  log?: Logger;
  now?: () => Date;
}

/** How long the gateway reuses the registered endpoints before reading them again (other processes'
 * changes); this process's own changes take effect at once. */
export const VENDOR_CACHE_MS = 2_000;

type VendorRow = {
  id: string;
  name: string;
  services: string[];
  phi_class: DataClass;
  created_at: Date | string;
};

/** Registered vendors (database) and infrastructure destinations (configuration). */
export class VendorRegistry implements DestinationSource {
  #cache: { at: number; byKey: Map<string, Destination> } | undefined;
  readonly #warned = new Map<string, number>();

  constructor(private readonly deps: VendorRegistryDeps) {}

  private now(): Date {
    return this.deps.now?.() ?? new Date();
  }

  /** Registers a vendor (no endpoint, no BAA yet). Audited: `vendor.created`. */
  async addVendor(req: Loose<AddVendorRequest>, requestId = newId()): Promise<Vendor> {
    const v = validateVendor(req);
    const vendorId = newId();
    await this.deps.db.transaction(async (tx) => {
      const dup = await tx.query('SELECT 1 FROM vendor WHERE lower(name) = lower($1)', [v.name]);
      if (dup.rows.length > 0 || this.infra().some((i) => i.name.toLowerCase() === v.name.toLowerCase()))
        throw new CustosError('VENDOR_CONFLICT', [
          {
            severity: 'error',
            code: 'duplicate',
            expression: 'name',
            diagnostics: 'A vendor has that name.',
          },
        ]);
      await tx.query(
        `INSERT INTO vendor (id, name, services, phi_class, created_by) VALUES ($1, $2, $3, $4, $5)`,
        [vendorId, v.name, v.services, v.phiClass, v.recordedBy],
      );
      // In the transaction: if the audit log cannot take it, nothing is written.
      await this.deps.audit.append(
        adminEvent('vendor.created', { requestId, resource: { type: 'Vendor', id: vendorId } }),
      );
    });
    this.#cache = undefined;
    return this.show(vendorId);
  }

  /** Adds an endpoint (host, port, protocol) to a vendor. Audited: `vendor.endpoint_added`. */
  async addEndpoint(req: Loose<AddEndpointRequest>, requestId = newId()): Promise<Vendor> {
    const e = validateEndpoint(req);
    const vendorId = await this.resolveId(e.vendor);
    const endpointId = newId();
    await this.deps.db.transaction(async (tx) => {
      const dup = await tx.query('SELECT 1 FROM vendor_endpoint WHERE host = $1 AND port = $2', [
        e.host,
        e.port,
      ]);
      const infra = this.infra().some((v) => v.endpoints.some((x) => x.host === e.host && x.port === e.port));
      if (dup.rows.length > 0 || infra)
        throw new CustosError('VENDOR_CONFLICT', [
          {
            severity: 'error',
            code: 'duplicate',
            expression: 'host',
            diagnostics: 'That host and port are already an endpoint of a vendor.',
          },
        ]);
      await tx.query(
        `INSERT INTO vendor_endpoint (id, vendor_id, host, port, protocol, allow_private, created_by)
         VALUES ($1, $2, $3, $4, $5, $6, $7)`,
        [endpointId, vendorId, e.host, e.port, e.protocol, e.allowPrivate, e.recordedBy],
      );
      await this.deps.audit.append(
        adminEvent('vendor.endpoint_added', {
          requestId,
          resource: { type: 'VendorEndpoint', id: endpointId },
        }),
      );
    });
    this.#cache = undefined;
    return this.show(vendorId);
  }

  /** Records a vendor's BAA (a renewal adds a row; the newest is in force). Audited: `vendor.baa_recorded`. */
  async recordBaa(req: Loose<RecordVendorBaaRequest>, requestId = newId()): Promise<Vendor> {
    const b = validateVendorBaa(req, this.now());
    const vendorId = await this.resolveId(b.vendor);
    const baaId = newId();
    await this.deps.db.transaction(async (tx) => {
      await tx.query(
        `INSERT INTO vendor_baa (id, vendor_id, executed, executed_at, expires_on, document_sha256, recorded_by, recorded_at)
         VALUES ($1, $2, $3, $4, $5, $6, $7, $8)`,
        [
          baaId,
          vendorId,
          b.executed,
          b.executedAt || null,
          b.expiresOn || null,
          b.documentSha256 || null,
          b.recordedBy,
          this.now().toISOString(),
        ],
      );
      await this.deps.audit.append(
        adminEvent('vendor.baa_recorded', { requestId, resource: { type: 'VendorBaa', id: baaId } }),
      );
    });
    this.#cache = undefined;
    return this.show(vendorId);
  }

  /** Every vendor: infrastructure first, then registered ones by name. */
  async list(): Promise<Vendor[]> {
    const rows = await this.deps.db.query<VendorRow>(
      'SELECT id, name, services, phi_class, created_at FROM vendor ORDER BY lower(name), id',
    );
    const vendors = await this.hydrate(rows.rows);
    return [...this.infra(), ...vendors];
  }

  /** One vendor by id or name. */
  async show(idOrName: string): Promise<Vendor> {
    const infra = this.infra().find((v) => v.vendorId === idOrName || v.name === idOrName);
    if (infra) return infra;
    const id = await this.resolveId(idOrName);
    const rows = await this.deps.db.query<VendorRow>(
      'SELECT id, name, services, phi_class, created_at FROM vendor WHERE id = $1',
      [id],
    );
    return (await this.hydrate(rows.rows))[0]!;
  }

  /** The endpoint registered for `host:port` (normalized host), with its vendor's state. */
  async find(host: string, port: number): Promise<Destination | undefined> {
    const now = Date.now();
    if (!this.#cache || now - this.#cache.at > VENDOR_CACHE_MS)
      this.#cache = { at: now, byKey: destinationIndex(await this.list()) };
    return this.#cache.byKey.get(destinationKey(host, port));
  }

  /**
   * Logs `vendor.baa_expiring` (warn) for every vendor whose BAA expires within 30 days and
   * `vendor.baa_expired` for those past it; at most once a day per vendor. The server runs it at
   * start and daily; the gateway also runs it when it sends to a vendor.
   */
  async warnExpiring(vendors?: readonly Vendor[]): Promise<void> {
    const log = this.deps.log;
    if (!log) return;
    for (const v of vendors ?? (await this.list())) this.warnOne(v);
  }

  warnOne(v: Pick<Vendor, 'vendorId' | 'baaState' | 'expiresInDays'>): void {
    const log = this.deps.log;
    if (!log || (v.baaState !== 'expiring' && v.baaState !== 'expired')) return;
    const last = this.#warned.get(v.vendorId);
    const now = Date.now();
    if (last !== undefined && now - last < 86_400_000) return;
    this.#warned.set(v.vendorId, now);
    log.warn(v.baaState === 'expiring' ? 'vendor.baa_expiring' : 'vendor.baa_expired', {
      resourceType: 'Vendor',
      resourceId: v.vendorId,
      count: v.expiresInDays,
    });
  }

  private infra(): readonly Vendor[] {
    return this.deps.infrastructure ?? [];
  }

  private async resolveId(idOrName: string): Promise<string> {
    const r = await this.deps.db.query<{ id: string }>(
      'SELECT id FROM vendor WHERE id = $1 OR lower(name) = lower($1) ORDER BY (id = $1) DESC LIMIT 1',
      [idOrName],
    );
    const id = r.rows[0]?.id;
    if (!id) {
      if (this.infra().some((v) => v.vendorId === idOrName || v.name === idOrName))
        throw new CustosError('VENDOR_INVALID', [
          {
            severity: 'error',
            code: 'business-rule',
            expression: 'vendor',
            diagnostics:
              'Infrastructure destinations come from the configuration (environment) and are changed there.',
          },
        ]);
      throw new CustosError('VENDOR_NOT_FOUND');
    }
    return id;
  }

  private async hydrate(rows: VendorRow[]): Promise<Vendor[]> {
    if (rows.length === 0) return [];
    const ids = rows.map((r) => r.id);
    const eps = await this.deps.db.query<{
      id: string;
      vendor_id: string;
      host: string;
      port: number;
      protocol: EndpointProtocol;
      allow_private: boolean;
    }>(
      `SELECT id, vendor_id, host, port, protocol, allow_private FROM vendor_endpoint
        WHERE vendor_id = ANY($1) ORDER BY created_at, id`,
      [ids],
    );
    const baas = await this.deps.db.query<{
      id: string;
      vendor_id: string;
      executed: boolean;
      executed_at: string | null;
      expires_on: string | null;
      document_sha256: string | null;
      recorded_by: string;
      recorded_at: Date | string;
    }>(
      `SELECT DISTINCT ON (vendor_id) id, vendor_id, executed, executed_at, expires_on, document_sha256,
              recorded_by, recorded_at
         FROM vendor_baa WHERE vendor_id = ANY($1) ORDER BY vendor_id, recorded_at DESC, id DESC`,
      [ids],
    );
    const now = this.now();
    return rows.map((r) => {
      const b = baas.rows.find((x) => x.vendor_id === r.id);
      const baa: VendorBaa | undefined = b && {
        baaId: b.id,
        executed: b.executed,
        executedAt: b.executed_at ?? undefined,
        expiresOn: b.expires_on ?? undefined,
        documentSha256: b.document_sha256 ?? undefined,
        recordedBy: b.recorded_by,
        recordedAt: new Date(b.recorded_at).toISOString(),
      };
      return {
        vendorId: r.id,
        name: r.name,
        kind: 'vendor' as const,
        services: r.services,
        phiClass: r.phi_class,
        endpoints: eps.rows
          .filter((e) => e.vendor_id === r.id)
          .map((e) => ({
            endpointId: e.id,
            host: e.host,
            port: Number(e.port),
            protocol: e.protocol,
            allowPrivate: e.allow_private,
          })),
        baa,
        ...baaStateOf(baa, now),
        createdAt: new Date(r.created_at).toISOString(),
      };
    });
  }
}
