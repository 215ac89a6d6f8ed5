import jsonPatch, { type Operation } from 'fast-json-patch';

const { applyPatch } = jsonPatch;
import {
  CustosError,
  ERROR_CATALOG,
  isCustosError,
  type ErrorCode,
  type IssueDetail,
} from '../kernel/errors.ts';
import { isFhirId, newId } from '../kernel/ids.ts';
import type { Logger } from '../log/logger.ts';
import { errorFields } from '../log/logger.ts';
import type { AuditAction, AuditEvent } from '../audit/audit-event.ts';
import type { AuditLog } from '../audit/audit-log.ts';
import type { SensitiveFields } from '../audit/audit-sealer.ts';
import { AUDIT_READ_PURPOSES, AUDIT_UNSEAL_PURPOSES, type AuditReadAccess } from '../audit/audit-query.ts';
import { ResourceStore, type Project, type StoredVersion } from '../store/resource-store.ts';
import type { SqlDriver, SqlQueryable } from '../store/sql-driver.ts';
import { classifyDatabaseError } from '../store/sql-driver.ts';
import { patientCompartment } from '../fhir/patient-compartment.ts';
import { BREAK_GLASS_PURPOSES, PURPOSES_OF_USE } from './purpose-of-use.ts';
import { TtlCache } from '../kernel/ttl-cache.ts';
import type { SmartScope } from '../auth/smart-scopes.ts';
import { extractSearchIndex, type SearchIndex } from '../fhir/search-index.ts';
import { parseSearch, type SearchRequest } from '../fhir/search-request.ts';
import {
  runSearch,
  searchIds,
  type BlindCheck,
  type SearchAccess,
  type SearchRow,
} from '../store/search-sql.ts';
import { selectElements, summarize, unknownElements } from '../fhir/summary.ts';
import { blindIndexKey, Envelope, protectedIndexKeys } from '../crypto/envelope.ts';
import {
  ALL_CLASSES,
  labelMasked,
  restoreProtected,
  splitProtected,
  type PolicyRule,
  type ProtectedElement,
  type SensitivityClass as ProtectedClass,
} from '../crypto/protection-policy.ts';
import { ProtectedParams, visibleClasses } from './minimum-necessary.ts';
import {
  AccessControl,
  careTeamPatients,
  openBreakGlass,
  or,
  DEFAULT_BREAK_GLASS_MINUTES,
  loadPolicies,
  needsCareTeam,
  practitionerOf,
  type StoredPolicy,
  type UserRole,
  type VersionFacts,
} from './access-policy.ts';
import { detectRealLookingPhi, phiFindingIssues } from './phi-detector.ts';

/** The SMART interactions a scope grants: create, read, update, delete, search. */
export type Interaction = 'c' | 'r' | 'u' | 'd' | 's';

/**
 * Who is asking, as established by authentication. The gateway trusts nothing else about the
 * caller. `can` is the effective permission (today: the token's SMART scopes intersected with the
 * client's registration; the access issue adds roles and policies).
 */
export interface Principal {
  projectId: string;
  clientId: string;
  /** Set when a person is behind the request (a token from the authorization code flow). */
  userId?: string;
  /** The person's role in the project (users.ts USER_ROLES); absent for system clients. */
  userRole?: 'practitioner' | 'patient' | 'admin' | 'auditor';
  /** The person's FHIR identity (`Patient/123`, `Practitioner/abc`), the token's `fhirUser`. */
  fhirUser?: string;
  /** SMART launch context (`launch/patient`): the Patient id the token's `patient/` scopes are confined to. */
  launchPatient?: string;
  /** The token's granted SMART resource scopes (all contexts), already narrowed to the client's registration. */
  scopes?: readonly SmartScope[];
  roles: readonly string[];
  allowedPurposes: readonly string[];
  mayBreakGlass: boolean;
  /** Default purpose carried by the token (`purpose_of_use` claim). */
  tokenPurpose?: string;
  can(resourceType: string, interaction: Interaction): boolean;
}

/** Per-request facts the gateway records. */
export interface RequestFacts {
  requestId: string;
  sourceIp?: string;
  /** `X-Purpose-Of-Use` header, if sent. */
  purposeHeader?: string;
  /** `X-Break-Glass-Reason` header, if sent (never stored in clear: see audit-event.ts). */
  breakGlassReason?: string;
  /** `User-Agent` header, if sent (never stored in clear: sealed into audit events). */
  userAgent?: string;
}

export interface GatewayDeps {
  /** The resource database; the gateway builds the only ResourceStore over it. */
  db: SqlDriver;
  audit: AuditLog;
  log: Logger;
  /** Structural validation against the base R4 StructureDefinitions. */
  validate: (resource: unknown) => IssueDetail[];
  isResourceType: (type: string) => boolean;
  /** Every resource type this server serves (system search spans those the caller may search). */
  resourceTypes: Iterable<string>;
  /** The public FHIR base URL: absolute references to this server index as relative ones. */
  fhirBaseUrl?: string;
  /**
   * Field-level encryption (issue 5): protected elements are sealed under the project's data key
   * and replaced by placeholders; absent means encryption is off (bench/ only; production refuses).
   */
  encryption?: { envelope: Envelope; policy: readonly PolicyRule[] };
  /** Index extraction on writes (default true; off only to measure its cost in bench/). */
  searchIndexing?: boolean;
  /** Upper bound on one search's SQL statements (PostgreSQL only), in ms. */
  searchTimeoutMs?: number;
  /** Length of a break-glass grant in minutes, unless the role policy sets its own (default 60). */
  breakGlassMinutes?: number;
  now?: () => Date;
}

type SessionDeps = Omit<GatewayDeps, 'db'> & {
  store: ResourceStore;
  loadProject: (id: string) => Promise<Project | undefined>;
  loadPolicies: (projectId: string) => Promise<Map<UserRole, StoredPolicy>>;
  /** The patients of a practitioner's care team (cached like policies; dropped when this gateway writes a Patient or CareTeam). */
  careTeam: (projectId: string, practitionerId: string) => Promise<string[]>;
  careTeamChanged: () => void;
  protectedParams: ProtectedParams | undefined;
};

/** How long a project record (kind, provenance setting) is reused before it is read again. */
export const PROJECT_CACHE_MS = 2000;

/** How long a project's access policies are reused before they are read again: a change takes effect within this time. */
export const POLICY_CACHE_MS = 2000;

/** What one write step did: its status and the versions it wrote (or found, for a matched condition). */
interface StepResult {
  status: number;
  versions: StoredVersion[];
  existing?: boolean;
}

/** The result of one interaction, independent of HTTP. */
export interface InteractionResult {
  status: number;
  version?: StoredVersion;
  /** Bundle or OperationOutcome JSON built by the gateway (history, batch). */
  body?: string;
  /** For conditional create that matched: the existing resource. */
  existing?: boolean;
}

export interface WriteOptions {
  ifMatch?: number;
  ifNoneExist?: string;
}

/** History for a person whose access is narrowed: at most this many batches are read per page. */
const HISTORY_SCAN_ROUNDS = 10;

/** Opens (or finds) the break-glass grant of a person, the alert an administrator reviews. */
async function openBreakGlassGrant(
  deps: SessionDeps,
  p: Principal,
  purpose: string,
  requestId: string,
  now: Date,
  minutes: number | undefined,
): Promise<void> {
  await openBreakGlass(deps.store.db, {
    projectId: p.projectId,
    userId: p.userId!,
    clientId: p.clientId,
    role: p.userRole ?? 'unknown',
    purpose,
    requestId,
    now,
    minutes: minutes ?? deps.breakGlassMinutes ?? DEFAULT_BREAK_GLASS_MINUTES,
  });
}

const EMPTY_INDEX: SearchIndex = { keys: [], strings: [], dates: [], numbers: [] };

const HTEST = { system: 'http://terminology.hl7.org/CodeSystem/v3-ActReason', code: 'HTEST' };
const DATA_OPERATION = 'http://terminology.hl7.org/CodeSystem/v3-DataOperation';

/**
 * The PHI gateway: the one way to the resource store (DESIGN.md rule 1). It is opened per request
 * for an authenticated principal; every interaction checks purpose of use and scope, and writes an
 * audit record before returning anything (reads) or around the commit (writes: attempt, commit,
 * outcome). If the audit record cannot be made durable, no PHI is returned and nothing is committed.
 */
export class PhiGateway {
  private readonly deps: SessionDeps;
  constructor(deps: GatewayDeps) {
    const store = new ResourceStore(deps.db);
    const projects = new TtlCache<string, Project | undefined>(1000);
    const loadProject = async (id: string) => {
      const cached = projects.get(id);
      if (cached) return cached;
      const project = await store.getProject(id);
      if (project) projects.set(id, project, Date.now() + PROJECT_CACHE_MS);
      return project;
    };
    const protectedParams = deps.encryption ? new ProtectedParams(deps.encryption.policy) : undefined;
    const policies = new TtlCache<string, Map<UserRole, StoredPolicy>>(1000);
    const loadPolicyMap = async (projectId: string) => {
      const cached = policies.get(projectId);
      if (cached) return cached;
      const loaded = await loadPolicies(store.db, projectId);
      policies.set(projectId, loaded, Date.now() + POLICY_CACHE_MS);
      return loaded;
    };
    // Care teams change with Patient and CareTeam writes: this gateway's own writes drop the cache at
    // once; other processes' are seen within POLICY_CACHE_MS, as policy changes are.
    const careTeams = new TtlCache<string, string[]>(10_000);
    let careTeamGeneration = 0;
    const careTeam = async (projectId: string, practitionerId: string) => {
      const key = `${careTeamGeneration}|${projectId}|${practitionerId}`;
      const cached = careTeams.get(key);
      if (cached) return cached;
      const loaded = await careTeamPatients(store.db, projectId, practitionerId);
      careTeams.set(key, loaded, Date.now() + POLICY_CACHE_MS);
      return loaded;
    };
    const careTeamChanged = () => void careTeamGeneration++;
    this.deps = {
      ...deps,
      store,
      loadProject,
      loadPolicies: loadPolicyMap,
      careTeam,
      careTeamChanged,
      protectedParams,
    };
  }

  session(principal: Principal, facts: RequestFacts): PhiSession {
    return new PhiSession(this.deps, principal, facts);
  }

  /** Audits a request refused before a principal could be established (bad or missing token). */
  async recordUnauthenticated(
    facts: RequestFacts,
    action: AuditAction,
    resourceType: string | undefined,
  ): Promise<void> {
    await this.deps.audit.append(
      {
        v: 1,
        id: newId(),
        time: (this.deps.now?.() ?? new Date()).toISOString(),
        phase: 'access',
        action,
        outcome: 'refused',
        code: 'UNAUTHENTICATED',
        requestId: facts.requestId,
        actor: {},
        resource: resourceType && this.deps.isResourceType(resourceType) ? { type: resourceType } : undefined,
        source: { ip: facts.sourceIp },
      },
      { userAgent: facts.userAgent },
    );
  }
}

type BundleEntry = {
  fullUrl?: string;
  resource?: Record<string, unknown>;
  request?: { method?: string; url?: string; ifMatch?: string; ifNoneExist?: string };
};

export class PhiSession {
  private readonly purpose: string | undefined;
  private purposeError: ErrorCode | undefined;
  /** The query string of the search (or audit-log read) this session runs, sealed into its events. */
  private sensitiveQuery: string | undefined;
  private project: Project | undefined;
  /** While a transaction bundle runs: fresh versions waiting to be inserted in one statement. */
  private freshBuffer: StoredVersion[] | undefined;
  /** The data and blind-index keys of this project's current epoch, loaded before a write transaction. */
  private keys: { epoch: number; dek: Buffer; blindKey: Buffer } | undefined;
  /**
   * The plaintext of the protected elements of each version this session wrote, per class: the
   * write's response is revealed from it (masked exactly as a read would) instead of re-opening
   * what was just sealed. Only versions this session made are in it.
   */
  private readonly plaintextOf = new WeakMap<object, ReadonlyMap<string, readonly ProtectedElement[]>>();
  /** A person's effective access (access-policy.ts), once loaded; undefined for system clients. */
  private accessCtl: AccessControl | undefined;
  private accessReady: Promise<void> | undefined;

  constructor(
    private readonly deps: SessionDeps,
    private readonly principal: Principal,
    private readonly facts: RequestFacts,
  ) {
    const claimed = facts.purposeHeader?.trim() || principal.tokenPurpose;
    this.purpose = claimed && PURPOSES_OF_USE.has(claimed) ? claimed : undefined;
    if (!claimed) this.purposeError = 'PURPOSE_REQUIRED';
    else if (!PURPOSES_OF_USE.has(claimed)) this.purposeError = 'PURPOSE_NOT_ALLOWED';
    else if (BREAK_GLASS_PURPOSES.has(claimed)) {
      // Break-glass is for people (INTERFACE.md): a system client never, whatever its registration
      // says; a person only with a reason, and only if their role policy allows it (prepareAccess).
      if (!principal.userId || !facts.breakGlassReason?.trim()) this.purposeError = 'BREAK_GLASS_NOT_ALLOWED';
    } else if (!principal.allowedPurposes.includes(claimed)) this.purposeError = 'PURPOSE_NOT_ALLOWED';
  }

  /** Whether this session runs under a person's role policy (a token with a user behind it). */
  private get isPerson(): boolean {
    return this.principal.userId !== undefined;
  }

  /**
   * Loads a person's effective access once per session: the role policy of the project, the
   * purposes it allows, a break-glass grant (opened, with its alert, on the first request that
   * breaks the glass), and the care team when the policy narrows to it.
   */
  private prepareAccess(): Promise<void> {
    this.accessReady ??= (async () => {
      if (!this.isPerson) return;
      const p = this.principal;
      const role = p.userRole;
      const stored = role ? (await this.deps.loadPolicies(p.projectId)).get(role) : undefined;
      const policy = stored?.policy ?? { rules: [], purposes: [], breakGlass: false };
      let breakGlass = false;
      if (!this.purposeError && this.purpose) {
        if (BREAK_GLASS_PURPOSES.has(this.purpose)) {
          if (!policy.breakGlass) this.purposeError = 'BREAK_GLASS_NOT_ALLOWED';
          else {
            await openBreakGlassGrant(
              this.deps,
              p,
              this.purpose,
              this.facts.requestId,
              this.now(),
              policy.breakGlassMinutes,
            );
            breakGlass = true;
          }
        } else if (!policy.purposes.includes(this.purpose)) this.purposeError = 'PURPOSE_NOT_ALLOWED';
      }
      const practitioner = practitionerOf(p);
      const careTeam =
        !breakGlass && needsCareTeam(policy) && practitioner
          ? await this.deps.careTeam(p.projectId, practitioner)
          : [];
      this.accessCtl = new AccessControl({
        principal: p,
        policy,
        breakGlass,
        careTeam,
        baseUrl: this.deps.fhirBaseUrl ?? '',
      });
    })();
    return this.accessReady;
  }

  /** What of one stored version a predicate is evaluated on (compartment, index keys as stored). */
  private versionFacts(v: { patients: readonly string[]; json?: string }): VersionFacts {
    let keys: ReadonlySet<string> | undefined;
    return {
      patients: v.patients,
      keys: () =>
        (keys ??= new Set(
          v.json
            ? extractSearchIndex(JSON.parse(v.json) as Record<string, unknown>, this.deps.fhirBaseUrl).keys
            : [],
        )),
    };
  }

  /** Whether this person's access reaches one version (true for system clients). */
  private reaches(type: string, i: Interaction, v: { patients: readonly string[]; json?: string }): boolean {
    const ctl = this.accessCtl;
    if (!ctl) return true;
    const pred = ctl.predicate(type, i);
    return pred.op === 'true' || (pred.op !== 'false' && ctl.allows(type, i, this.versionFacts(v)));
  }

  /** The classes the purpose of use reveals, narrowed by the role policy (minimum necessary). */
  private visible(): ReadonlySet<string> {
    const byPurpose = visibleClasses(this.purpose);
    const byRole = this.accessCtl?.visibleClasses;
    return byRole ? new Set([...byPurpose].filter((c) => byRole.includes(c))) : byPurpose;
  }

  private now(): Date {
    return this.deps.now?.() ?? new Date();
  }

  private event(
    partial: Pick<AuditEvent, 'phase' | 'action' | 'outcome'> & Partial<AuditEvent>,
    requestId = this.facts.requestId,
  ): AuditEvent {
    return {
      v: 1,
      id: newId(),
      time: this.now().toISOString(),
      requestId,
      projectId: this.principal.projectId,
      actor: {
        clientId: this.principal.clientId,
        userId: this.principal.userId,
        roles: [...this.principal.roles],
      },
      purpose: this.purpose,
      source: { ip: this.facts.sourceIp },
      ...partial,
    };
  }

  /**
   * What this session's events carry sealed (audit-sealer.ts): the user agent, a break-glass reason,
   * and for searches and audit-log reads the query string.
   */
  private sensitive(action: AuditAction): SensitiveFields {
    const claimed = this.facts.purposeHeader?.trim() || this.principal.tokenPurpose;
    return {
      userAgent: this.facts.userAgent,
      breakGlassReason:
        claimed && BREAK_GLASS_PURPOSES.has(claimed) ? this.facts.breakGlassReason : undefined,
      query: action === 'search' || action === 'audit-read' ? this.sensitiveQuery : undefined,
    };
  }

  /** Appends durably or throws AUDIT_UNAVAILABLE (fail-closed). */
  private async audit(e: AuditEvent): Promise<void> {
    try {
      await this.deps.audit.append(e, this.sensitive(e.action));
    } catch (err) {
      this.deps.log.error('audit.append_failed', { requestId: e.requestId, ...errorFields(err) });
      throw new CustosError('AUDIT_UNAVAILABLE');
    }
  }

  /**
   * Opens the sealed classes of a stored version that the purpose of use reveals and puts them
   * back; withheld classes stay as data-absent-reason placeholders and the MASKED label is added.
   * `q`: the open transaction, when called inside one (PGlite has a single connection).
   */
  private async reveal<
    T extends {
      resourceType: string;
      id: string;
      versionId: number;
      json?: string;
      sealed?: Record<string, string>;
    },
  >(v: T, q?: SqlQueryable): Promise<T> {
    const enc = this.deps.encryption;
    if (!v.sealed || !v.json || !enc) return v;
    const visible = this.visible();
    const resource = JSON.parse(v.json) as Record<string, unknown>;
    const known = this.plaintextOf.get(v);
    let masked = false;
    for (const [cls, blob] of Object.entries(v.sealed)) {
      if (!visible.has(cls)) {
        masked = true;
        continue;
      }
      const elements = known?.get(cls);
      if (elements) {
        restoreProtected(resource, elements);
        continue;
      }
      const ctx = {
        projectId: this.principal.projectId,
        type: v.resourceType,
        id: v.id,
        version: v.versionId,
      };
      const sealCtx = { ...ctx, cls: cls as ProtectedClass };
      // Synchronously when the data key is cached (most reads), else through an unwrap.
      const plain = enc.envelope.openCached(sealCtx, blob) ?? (await enc.envelope.open(sealCtx, blob, q));
      restoreProtected(resource, JSON.parse(plain.toString('utf8')) as ProtectedElement[]);
    }
    if (masked) labelMasked(resource);
    return { ...v, json: JSON.stringify(resource), sealed: undefined };
  }

  private async revealAll<
    T extends {
      resourceType: string;
      id: string;
      versionId: number;
      json?: string;
      sealed?: Record<string, string>;
    },
  >(rows: T[]): Promise<T[]> {
    const out: T[] = [];
    for (const r of rows) out.push(await this.reveal(r));
    return out;
  }

  /** Purpose and scope checks; a refusal is audited before it is thrown. */
  private async guard(
    action: AuditAction,
    type: string,
    interaction: Interaction,
    id?: string,
    requestId?: string,
  ): Promise<void> {
    if (!this.deps.isResourceType(type)) throw new CustosError('UNKNOWN_RESOURCE_TYPE');
    // AuditEvents are the audit log itself, served read-only by its own API (docs/audit.md): never
    // written to or read from the resource store.
    if (type === 'AuditEvent' && action !== 'audit-read') throw new CustosError('AUDIT_EVENT_READ_ONLY');
    if (id !== undefined && !isFhirId(id)) throw new CustosError('INVALID_ID');
    await this.prepareAccess();
    let refusal: ErrorCode | undefined = this.purposeError;
    const ctl = this.accessCtl;
    if (!refusal && ctl) {
      refusal = ctl.denial(type, interaction);
      // The audit log is read whole or not at all: no per-resource narrowing applies to it.
      if (!refusal && action === 'audit-read' && ctl.predicate(type, interaction).op !== 'true')
        refusal = 'FORBIDDEN_POLICY';
    } else if (!refusal && !this.principal.can(type, interaction)) refusal = 'FORBIDDEN_SCOPE';
    if (refusal) {
      await this.audit(
        this.event(
          { phase: 'access', action, outcome: 'refused', code: refusal, resource: { type, id } },
          requestId,
        ),
      );
      throw new CustosError(refusal);
    }
  }

  private async getProject(): Promise<Project> {
    this.project ??= await this.deps.loadProject(this.principal.projectId);
    if (!this.project) throw new CustosError('UNAUTHENTICATED');
    return this.project;
  }

  // ---- reads: fetch, audit durably, then return -------------------------------------------

  async read(type: string, id: string): Promise<InteractionResult> {
    await this.guard('read', type, 'r', id);
    return this.returnAudited(
      'read',
      type,
      id,
      await this.deps.store.read(this.principal.projectId, type, id),
    );
  }

  async vread(type: string, id: string, versionId: string): Promise<InteractionResult> {
    await this.guard('vread', type, 'r', id);
    const n = /^\d{1,9}$/.test(versionId) ? Number(versionId) : undefined;
    const v =
      n === undefined ? undefined : await this.deps.store.vread(this.principal.projectId, type, id, n);
    return this.returnAudited('vread', type, id, v);
  }

  /** Audits a fetched version (durably), then hands it out: 200, 410 for a deletion, or 404. */
  private async returnAudited(
    action: 'read' | 'vread',
    type: string,
    id: string,
    found: StoredVersion | undefined,
  ): Promise<InteractionResult> {
    let v = found;
    if (v && !this.reaches(type, 'r', v)) {
      // Outside the person's policy: audited as the refusal it is, answered as not found so that
      // the answer does not tell whether the resource exists.
      await this.audit(
        this.event({
          phase: 'access',
          action,
          outcome: 'refused',
          code: 'FORBIDDEN_POLICY',
          resource: { type, id },
          patients: v.patients,
        }),
      );
      throw new CustosError('NOT_FOUND');
    }
    try {
      if (v && !v.deleted) v = await this.reveal(v);
    } catch (e) {
      // A missing key or a ciphertext that fails its check: audited as a failed read, nothing returned.
      const code: ErrorCode = isCustosError(e) ? e.code : 'INTERNAL';
      await this.audit(
        this.event({
          phase: 'access',
          action,
          outcome: 'failed',
          code,
          resource: { type, id },
          patients: v?.patients,
        }),
      );
      throw e;
    }
    await this.audit(
      this.event({
        phase: 'access',
        action,
        outcome: v && !v.deleted ? 'success' : 'failed',
        code: !v ? 'NOT_FOUND' : v.deleted ? 'GONE' : undefined,
        resource: { type, id, version: v ? String(v.versionId) : undefined },
        patients: v?.patients,
      }),
    );
    if (!v) throw new CustosError('NOT_FOUND');
    return { status: v.deleted ? 410 : 200, version: v };
  }

  /** Instance, type or system history (type and id undefined for system history). */
  async history(
    baseUrl: string,
    opts: { type?: string; id?: string; since?: string; count?: number; cursor?: string },
  ): Promise<InteractionResult> {
    const count = Math.min(Math.max(opts.count ?? 50, 1), 1000);
    if (opts.type) await this.guard('history', opts.type, 'r', opts.id);
    else if ((await this.prepareAccess(), this.purposeError) || !this.systemHistoryAllowed()) {
      // System history spans every type: it needs read access to all of them.
      const code: ErrorCode = this.purposeError ?? 'FORBIDDEN_SCOPE';
      await this.audit(this.event({ phase: 'access', action: 'history', outcome: 'refused', code }));
      throw new CustosError(code);
    }
    const before =
      opts.cursor === undefined ? undefined : decodeHistoryCursor(opts.cursor, this.deps.isResourceType);
    if (opts.since !== undefined && Number.isNaN(Date.parse(opts.since)))
      throw new CustosError('BAD_REQUEST');
    const { page: allowed, more } = await this.historyPage(opts, count, before);
    const page = await this.revealAll(allowed);
    const patients = [...new Set(page.flatMap((v) => v.patients))].sort();
    await this.audit(
      this.event({
        phase: 'access',
        action: 'history',
        outcome: 'success',
        resource: opts.type ? { type: opts.type, id: opts.id } : undefined,
        patients,
        count: page.length,
      }),
    );
    const self = `${baseUrl}/${[opts.type, opts.id].filter(Boolean).join('/')}${opts.type ? '/' : ''}_history`;
    const links = [{ relation: 'self', url: self }];
    const last = page[page.length - 1];
    const at = more ?? last;
    if (more && at) {
      const cursor = Buffer.from(
        JSON.stringify([at.lastUpdated, at.resourceType, at.id, at.versionId]),
      ).toString('base64url');
      const qs = new URLSearchParams({ _count: String(count), _cursor: cursor });
      if (opts.since) qs.set('_since', opts.since);
      links.push({ relation: 'next', url: `${self}?${qs}` });
    }
    const entries = page.map((v) => {
      const url = `${v.resourceType}/${v.id}`;
      return `{"fullUrl":${JSON.stringify(`${baseUrl}/${url}`)},${v.json ? `"resource":${v.json},` : ''}"request":${JSON.stringify(
        {
          method: v.deleted ? 'DELETE' : v.versionId === 1 || v.method === 'create' ? 'POST' : 'PUT',
          url: v.versionId === 1 || v.method === 'create' ? v.resourceType : url,
        },
      )},"response":${JSON.stringify({
        status: v.deleted ? '204' : v.versionId === 1 ? '201' : '200',
        etag: `W/"${v.versionId}"`,
        lastModified: v.lastUpdated,
      })}}`;
    });
    const body = `{"resourceType":"Bundle","type":"history","link":${JSON.stringify(links)},"entry":[${entries.join(',')}]}`;
    return { status: 200, body };
  }

  /** System history spans every type: read access to all of them (a person: unrestricted on each). */
  private systemHistoryAllowed(): boolean {
    const ctl = this.accessCtl;
    if (!ctl) return this.principal.can('*', 'r');
    return [...this.deps.resourceTypes].every((t) => t === 'AuditEvent' || ctl.denial(t, 'r') === undefined);
  }

  /**
   * One page of history: `count` versions the caller may read, and where the next page starts (the
   * last version of this page, or, when versions were skipped as out of reach, the last one looked
   * at). A version is judged on its own compartment and index keys. For a person whose access is
   * narrowed, versions out of reach are skipped in memory, reading at most HISTORY_SCAN_ROUNDS
   * batches: a page may then be short, with a `next` link that continues after what was read.
   */
  private async historyPage(
    opts: { type?: string; id?: string; since?: string },
    count: number,
    before: { lastUpdated: string; type: string; id: string; versionId: number } | undefined,
  ): Promise<{ page: StoredVersion[]; more: StoredVersion | undefined }> {
    const ctl = this.accessCtl;
    const restricted = ctl && (opts.type ? ctl.predicate(opts.type, 'r').op !== 'true' : true);
    if (!restricted) {
      const versions = await this.deps.store.history(this.principal.projectId, {
        ...opts,
        count: count + 1,
        before,
      });
      const page = versions.slice(0, count);
      return { page, more: versions.length > count ? page[page.length - 1] : undefined };
    }
    const page: StoredVersion[] = [];
    let cursor = before;
    for (let round = 0; round < HISTORY_SCAN_ROUNDS; round++) {
      const batch = await this.deps.store.history(this.principal.projectId, {
        ...opts,
        count: count + 1,
        before: cursor,
      });
      for (const v of batch) {
        if (!this.reaches(v.resourceType, 'r', v)) {
          cursor = { lastUpdated: v.lastUpdated, type: v.resourceType, id: v.id, versionId: v.versionId };
          continue;
        }
        if (page.length === count) return { page, more: page[page.length - 1] };
        page.push(v);
        cursor = { lastUpdated: v.lastUpdated, type: v.resourceType, id: v.id, versionId: v.versionId };
      }
      if (batch.length <= count) return { page, more: undefined };
    }
    // Scanned enough for one request: continue after the last version looked at.
    const at = cursor!;
    return {
      page,
      more: {
        resourceType: at.type,
        id: at.id,
        versionId: at.versionId,
        lastUpdated: at.lastUpdated,
        deleted: false,
        method: 'update',
        json: undefined,
        patients: [],
      },
    };
  }

  /**
   * Search (https://hl7.org/fhir/R4/search.html): type search (`type`), system search (no type;
   * `_type` or every type the caller may search) and compartment search (`patient`). The caller's
   * access is part of the SQL; one audit entry names every patient whose data the page returns.
   */
  async search(
    baseUrl: string,
    opts: { type?: string; patient?: string; query: URLSearchParams; strict: boolean; path: string },
  ): Promise<InteractionResult> {
    this.sensitiveQuery = opts.query.toString();
    let types: string[];
    if (opts.type) {
      await this.guard('search', opts.type, 's');
      if (opts.patient !== undefined) {
        if (!isFhirId(opts.patient)) throw new CustosError('INVALID_ID');
        await this.guard('search', 'Patient', 'r', opts.patient);
      }
      types = [opts.type];
    } else {
      await this.prepareAccess();
      const named = opts.query
        .getAll('_type')
        .flatMap((v) => v.split(','))
        .map((t) => t.trim())
        .filter(Boolean);
      for (const t of named) if (!this.deps.isResourceType(t)) throw new CustosError('UNKNOWN_RESOURCE_TYPE');
      const candidates = named.length > 0 ? named : [...this.deps.resourceTypes];
      const ctl = this.accessCtl;
      types = candidates.filter(
        (t) => t !== 'AuditEvent' && (ctl ? ctl.denial(t, 's') === undefined : this.principal.can(t, 's')),
      );
      if (this.purposeError || types.length === 0 || (named.length > 0 && types.length < named.length)) {
        const code: ErrorCode = this.purposeError ?? 'FORBIDDEN_SCOPE';
        await this.audit(this.event({ phase: 'access', action: 'search', outcome: 'refused', code }));
        throw new CustosError(code);
      }
    }
    const req = parseSearch(types, opts.query, { strict: opts.strict });
    const elementIssues = req.elements && types.length === 1 ? unknownElements(types[0]!, req.elements) : [];
    const timeout = this.deps.searchTimeoutMs;
    const access = this.searchAccess(opts.patient);
    const enc = this.deps.encryption;
    if (enc) {
      const blindKey = await enc.envelope.blindKey(this.principal.projectId);
      const bits = enc.envelope.blindBits;
      access.protection = {
        classOf: (t, c) => this.deps.protectedParams?.classOf(t, c),
        blind: (k) => (blindKey ? blindIndexKey(blindKey, bits, k) : k),
      };
    }
    // No transaction: each statement is bounded on its own (searchQueries), with no round trips added.
    const raw = await runSearch(this.deps.store.searchQueries(timeout), req, access);
    const visible = this.visible();
    if (raw.blindChecks.some((c) => !visible.has(c.cls))) {
      // Searching by what the purpose of use may not see would reveal it through the matches.
      await this.audit(
        this.event({
          phase: 'access',
          action: 'search',
          outcome: 'refused',
          code: 'SEARCH_PROTECTED',
          resource: opts.type ? { type: opts.type } : undefined,
        }),
      );
      throw new CustosError('SEARCH_PROTECTED');
    }
    const page = {
      ...raw,
      matches: (await this.revealAll(raw.matches)).filter((row) =>
        passesBlindChecks(row, raw.blindChecks, this.deps.fhirBaseUrl),
      ),
      includes: await this.revealAll(raw.includes),
    };
    const rows = [...page.matches, ...page.includes];
    const patients = [...new Set(rows.flatMap((r) => r.patients))].sort();
    await this.audit(
      this.event({
        phase: 'access',
        action: 'search',
        outcome: 'success',
        resource: opts.type ? { type: opts.type } : undefined,
        patients,
        count: rows.length,
      }),
    );
    return { status: 200, body: searchBundle(baseUrl, opts.path, opts.query, req, page, elementIssues) };
  }

  // ---- the audit log: read-only, purpose-gated, every read audited ---------------------------

  /**
   * Authorizes a read of the audit log (src/audit/audit-query.ts): the checks of every interaction
   * (purpose of use claimed and allowed for the client, an `AuditEvent` scope for `interaction`), and
   * a purpose from AUDIT_READ_PURPOSES. A refusal is audited (action `audit-read`) and thrown; the
   * returned access records the read itself. Sealed fields open only for AUDIT_UNSEAL_PURPOSES.
   * `query`: the request's query string, sealed into those events.
   */
  async auditReader(interaction: 'r' | 's', query?: string): Promise<AuditReadAccess> {
    this.sensitiveQuery = query;
    await this.guard('audit-read', 'AuditEvent', interaction);
    const purpose = this.purpose!;
    if (!AUDIT_READ_PURPOSES.has(purpose)) {
      const refused = { phase: 'access', action: 'audit-read', outcome: 'refused' } as const;
      await this.audit(
        this.event({ ...refused, code: 'PURPOSE_NOT_ALLOWED', resource: { type: 'AuditEvent' } }),
      );
      throw new CustosError('PURPOSE_NOT_ALLOWED');
    }
    return {
      projectId: this.principal.projectId,
      purpose,
      unseal: AUDIT_UNSEAL_PURPOSES.has(purpose),
      record: (e) =>
        this.audit(
          this.event({
            phase: 'access',
            action: 'audit-read',
            outcome: e.outcome,
            code: e.code,
            resource: { type: 'AuditEvent', id: e.id },
            patients: e.patients,
            count: e.count,
          }),
        ),
    };
  }

  // ---- writes: attempt (durable), commit, outcome ------------------------------------------

  /** Checks a body for a write: type, id, HTEST label in sandboxes, structure. */
  private async checkBody(
    type: string,
    body: unknown,
    id: string | undefined,
    action: AuditAction = id === undefined ? 'create' : 'update',
  ): Promise<Record<string, unknown>> {
    if (body === null || typeof body !== 'object' || Array.isArray(body))
      throw new CustosError('BAD_REQUEST');
    const r = body as Record<string, unknown>;
    if (r.resourceType !== type) throw new CustosError('TYPE_MISMATCH');
    if (id !== undefined && r.id !== undefined && r.id !== id) throw new CustosError('ID_MISMATCH');
    const project = await this.getProject();
    if (project.kind === 'sandbox') {
      // A sandbox takes only data labelled as test data, and of that nothing that looks real
      // (src/phi/phi-detector.ts). Either refusal is audited; the values are never echoed.
      const findings = hasTestLabel(r) ? detectRealLookingPhi(r) : undefined;
      const code = !findings
        ? 'SANDBOX_REQUIRES_TEST_LABEL'
        : findings.length > 0
          ? 'SANDBOX_REAL_DATA'
          : undefined;
      if (code) {
        await this.audit(
          this.event({ phase: 'access', action, outcome: 'refused', code, resource: { type, id } }),
        );
        throw new CustosError(code, findings ? phiFindingIssues(findings) : []);
      }
    }
    const issues = this.deps.validate(r);
    if (issues.some((i) => i.severity === 'error')) throw new CustosError('VALIDATION_FAILED', issues);
    return r;
  }

  /**
   * Runs one audited write: the attempt is appended durably first; if that fails nothing is
   * committed. The outcome is appended after the commit; if that fails the write stands and
   * `custos audit verify` reports the attempt without outcome.
   */
  private async audited<T extends { versions: StoredVersion[] }>(
    action: AuditAction,
    resource: { type: string; id?: string },
    run: () => Promise<T>,
    requestId = this.facts.requestId,
  ): Promise<T> {
    // Resolved before any transaction opens: PGlite has one connection, so a query outside the
    // transaction while it is open would wait for it forever.
    await this.getProject();
    if (this.deps.encryption && !this.keys)
      this.keys = await this.deps.encryption.envelope.prepareWrite(this.principal.projectId);
    await this.audit(this.event({ phase: 'attempt', action, outcome: 'pending', resource }, requestId));
    let result: T;
    try {
      result = await run();
    } catch (e) {
      // A concurrent write won (duplicate key), or two transactions deadlocked on conditions: a conflict, not a crash.
      const kind = classifyDatabaseError(e);
      const code: ErrorCode = isCustosError(e)
        ? e.code
        : kind === 'unique_violation' || kind === 'serialization'
          ? 'VERSION_CONFLICT'
          : 'INTERNAL';
      await this.deps.audit
        .append(
          this.event({ phase: 'outcome', action, outcome: 'failed', code, resource }, requestId),
          this.sensitive(action),
        )
        .catch(() => this.deps.log.error('audit.outcome_failed', { requestId }));
      if (code === 'VERSION_CONFLICT' && !isCustosError(e)) throw new CustosError('VERSION_CONFLICT');
      throw e;
    }
    const first = result.versions[0];
    await this.deps.audit
      .append(
        this.event(
          {
            phase: 'outcome',
            action,
            outcome: 'success',
            resource:
              first && result.versions.length === 1
                ? { type: first.resourceType, id: first.id, version: String(first.versionId) }
                : resource,
            patients: [...new Set(result.versions.flatMap((v) => v.patients))].sort(),
            count: result.versions.length > 1 ? result.versions.length : undefined,
          },
          requestId,
        ),
        this.sensitive(action),
      )
      .catch(() => this.deps.log.error('audit.outcome_failed', { requestId }));
    return result;
  }

  /** Writes a version and, when the project records provenance, its Provenance, in `q`'s transaction. */
  private async writeVersion(
    q: SqlQueryable,
    w: {
      type: string;
      id: string;
      method: 'create' | 'update' | 'patch' | 'delete';
      resource: Record<string, unknown> | undefined;
      expectedVersion?: number;
      /** The id was just generated by the server: no earlier version can exist. */
      fresh?: boolean;
    },
  ): Promise<StoredVersion[]> {
    const project = await this.getProject();
    const lastUpdated = this.now().toISOString();
    const patients = w.resource
      ? patientCompartment({ ...w.resource, resourceType: w.type, id: w.id })
      : ((await this.deps.store.read(project.id, w.type, w.id, q))?.patients ?? []);
    await this.assertPolicyWrite(q, w, patients);
    const v = await this.storeWrite(q, {
      projectId: project.id,
      resourceType: w.type,
      id: w.id,
      method: w.method,
      resource: w.resource,
      patients,
      expectedVersion: w.expectedVersion,
      lastUpdated,
      fresh: w.fresh,
    });
    if (!project.provenanceEnabled || w.type === 'Provenance') return [v];
    const provenance: Record<string, unknown> = {
      resourceType: 'Provenance',
      meta: project.kind === 'sandbox' ? { security: [HTEST] } : undefined,
      target: [{ reference: `${w.type}/${w.id}/_history/${v.versionId}` }],
      recorded: lastUpdated,
      activity: {
        coding: [
          {
            system: DATA_OPERATION,
            code: w.method === 'create' ? 'CREATE' : w.method === 'delete' ? 'DELETE' : 'UPDATE',
          },
        ],
      },
      agent: [
        {
          type: {
            coding: [
              { system: 'http://terminology.hl7.org/CodeSystem/provenance-participant-type', code: 'author' },
            ],
          },
          who: { identifier: { system: 'urn:custos:client', value: this.principal.clientId } },
        },
      ],
    };
    const pid = newId();
    const p = await this.storeWrite(q, {
      projectId: project.id,
      resourceType: 'Provenance',
      id: pid,
      method: 'create',
      resource: provenance,
      patients: v.patients,
      lastUpdated,
      fresh: true,
    });
    return [v, p];
  }

  /**
   * A person may write only within their access: the version replaced or deleted, and the version
   * written, must each satisfy the predicate of the interaction (so a patient can neither touch nor
   * create a resource outside their compartment, nor move one out of it).
   */
  private async assertPolicyWrite(
    q: SqlQueryable,
    w: {
      type: string;
      id: string;
      method: string;
      resource: Record<string, unknown> | undefined;
      fresh?: boolean;
    },
    patients: readonly string[],
  ): Promise<void> {
    const ctl = this.accessCtl;
    if (!ctl) return;
    const i: Interaction = w.method === 'create' ? 'c' : w.method === 'delete' ? 'd' : 'u';
    if (ctl.predicate(w.type, i).op === 'true') return;
    if (!w.fresh) {
      const cur = await this.deps.store.read(this.principal.projectId, w.type, w.id, q);
      if (cur && !cur.deleted && !this.reaches(w.type, i, cur)) throw new CustosError('FORBIDDEN_POLICY');
    }
    if (w.resource) {
      // Judged on the index keys the version will be stored with (protected elements redacted).
      const full = { ...w.resource, resourceType: w.type, id: w.id };
      const enc = this.deps.encryption;
      let keys: ReadonlySet<string> | undefined;
      const facts: VersionFacts = {
        patients,
        keys: () =>
          (keys ??= new Set(
            extractSearchIndex(enc ? splitProtected(full, enc.policy).redacted : full, this.deps.fhirBaseUrl)
              .keys,
          )),
      };
      if (!ctl.allows(w.type, i, facts)) throw new CustosError('FORBIDDEN_POLICY');
    }
  }

  /** Writes a version now, or, for a fresh id inside a transaction bundle, queues it for one multi-row insert. */
  private async storeWrite(
    q: SqlQueryable,
    input: Omit<Parameters<ResourceStore['write']>[1], 'index'>,
  ): Promise<StoredVersion> {
    // The one place index rows are made (search issue): from the version about to be stored.
    // With encryption, protected elements are sealed and replaced by placeholders first; they
    // contribute blind-index keys only, never plaintext index rows.
    let index: SearchIndex | undefined = EMPTY_INDEX;
    let resource = input.resource;
    let seal: ((versionId: number) => Record<string, string> | undefined) | undefined;
    let written: ReadonlyMap<string, readonly ProtectedElement[]> | undefined;
    if (resource) {
      const full = { ...resource, resourceType: input.resourceType, id: input.id };
      const split = this.deps.encryption ? splitProtected(full, this.deps.encryption.policy) : undefined;
      if (split && split.byClass.size > 0) {
        const keys = this.keys;
        if (!keys) throw new CustosError('KEY_UNAVAILABLE');
        const ctx = { projectId: input.projectId, type: input.resourceType, id: input.id };
        resource = split.redacted;
        seal = (version) =>
          Object.fromEntries(
            [...split.byClass].map(([cls, els]) => [
              cls,
              Envelope.seal(
                keys.dek,
                keys.epoch,
                { ...ctx, version, cls },
                Buffer.from(JSON.stringify(els), 'utf8'),
              ),
            ]),
          );
      }
      if (this.deps.searchIndexing === false) index = undefined;
      else {
        index = extractSearchIndex(split?.byClass.size ? split.redacted : full, this.deps.fhirBaseUrl);
        if (split?.projection && this.keys) {
          // Blind keys only for the parameters that reach protected elements (protectedIndexKeys).
          const params = this.deps.protectedParams;
          const keys = new Set(index.keys);
          for (const k of protectedIndexKeys(
            extractSearchIndex(split.projection, this.deps.fhirBaseUrl).keys,
            (code) => params?.classOf(input.resourceType, code) !== undefined,
            this.keys.blindKey,
            this.deps.encryption!.envelope.blindBits,
          ))
            keys.add(k);
          index = { ...index, keys: [...keys] };
        }
      }
      written = split?.byClass.size ? split.byClass : undefined;
    }
    const w = { ...input, resource, index, seal };
    let v: StoredVersion;
    if (w.fresh && this.freshBuffer) {
      v = this.deps.store.prepareFresh(w);
      this.freshBuffer.push(v);
    } else v = await this.deps.store.write(q, w);
    if (v.resourceType === 'Patient' || v.resourceType === 'CareTeam') this.deps.careTeamChanged();
    if (written && v.sealed) this.plaintextOf.set(v, written);
    return v;
  }

  // Write steps, each run inside the caller's transaction `q`. Single interactions and
  // transaction bundles share them; bodies have passed `checkBody` already.
  private async createIn(
    q: SqlQueryable,
    type: string,
    resource: Record<string, unknown>,
    criteria: URLSearchParams | undefined,
    id = newId(),
  ): Promise<StepResult> {
    if (criteria) {
      // Race-free also inside a transaction bundle: identical conditions serialize here.
      await this.deps.store.lockCondition(q, this.conditionKey(type, criteria));
      const ids = await this.findIds(q, type, criteria);
      if (ids.length > 1) throw new CustosError('CONDITIONAL_MULTIPLE');
      if (ids.length === 1) {
        const cur = await this.deps.store.read(this.principal.projectId, type, ids[0]!, q);
        return { status: 200, versions: cur ? [cur] : [], existing: true };
      }
    }
    // Create ids are always generated here (newId, or planned for a transaction's urn:uuid).
    return {
      status: 201,
      versions: await this.writeVersion(q, { type, id, method: 'create', resource, fresh: true }),
    };
  }

  /**
   * An update replaces the whole resource. A caller whose purpose of use does not reveal a class
   * the current version holds would overwrite values it has only seen as placeholders: refused.
   */
  private async assertMayReplace(q: SqlQueryable, type: string, id: string): Promise<void> {
    if (!this.deps.encryption) return;
    const visible = this.visible();
    if (visible.size === ALL_CLASSES.length) return;
    const cur = await this.deps.store.read(this.principal.projectId, type, id, q);
    if (Object.keys(cur?.sealed ?? {}).some((c) => !visible.has(c))) throw new CustosError('FORBIDDEN_SCOPE');
  }

  private async updateIn(
    q: SqlQueryable,
    type: string,
    id: string,
    resource: Record<string, unknown>,
    ifMatch?: number,
  ): Promise<StepResult> {
    await this.assertMayReplace(q, type, id);
    const versions = await this.writeVersion(q, {
      type,
      id,
      method: 'update',
      resource,
      expectedVersion: ifMatch,
    });
    return { status: versions[0]!.versionId === 1 ? 201 : 200, versions };
  }

  /** Conditional update (https://hl7.org/fhir/R4/http.html#cond-update): no match creates, one match updates. */
  private async conditionalUpdateIn(
    q: SqlQueryable,
    type: string,
    criteria: URLSearchParams,
    resource: Record<string, unknown>,
  ): Promise<StepResult> {
    await this.deps.store.lockCondition(q, this.conditionKey(type, criteria));
    const ids = await this.findIds(q, type, criteria);
    if (ids.length > 1) throw new CustosError('CONDITIONAL_MULTIPLE');
    if (ids[0] && resource.id !== undefined && resource.id !== ids[0]) throw new CustosError('ID_MISMATCH');
    const id = ids[0] ?? (typeof resource.id === 'string' ? resource.id : newId());
    if (!isFhirId(id)) throw new CustosError('INVALID_ID');
    if (ids[0]) await this.assertMayReplace(q, type, id);
    const versions = await this.writeVersion(q, { type, id, method: ids[0] ? 'update' : 'create', resource });
    return { status: ids[0] ? 200 : 201, versions };
  }

  private async patchIn(
    q: SqlQueryable,
    type: string,
    id: string,
    operations: unknown,
    ifMatch?: number,
  ): Promise<StepResult> {
    if (!Array.isArray(operations)) throw new CustosError('INVALID_PATCH');
    const cur = await this.deps.store.read(this.principal.projectId, type, id, q);
    if (!cur) throw new CustosError('NOT_FOUND');
    if (cur.deleted || !cur.json) throw new CustosError('GONE');
    if (ifMatch !== undefined && ifMatch !== cur.versionId) throw new CustosError('VERSION_CONFLICT');
    // A patch applies to the whole resource: one the caller's purpose cannot fully see is refused.
    const visible = this.visible();
    if (Object.keys(cur.sealed ?? {}).some((c) => !visible.has(c))) throw new CustosError('FORBIDDEN_SCOPE');
    const full = await this.reveal(cur, q);
    let patched: Record<string, unknown>;
    try {
      // validate: true checks each operation; prototype modifications are refused by default.
      patched = applyPatch(JSON.parse(full.json!), operations as Operation[], true, true)
        .newDocument as Record<string, unknown>;
    } catch {
      throw new CustosError('INVALID_PATCH');
    }
    const resource = await this.checkBody(type, patched, id, 'patch');
    if (resource.id !== id) throw new CustosError('ID_MISMATCH');
    return {
      status: 200,
      versions: await this.writeVersion(q, {
        type,
        id,
        method: 'patch',
        resource,
        expectedVersion: cur.versionId,
      }),
    };
  }

  private async deleteIn(q: SqlQueryable, type: string, id: string): Promise<StepResult> {
    const cur = await this.deps.store.read(this.principal.projectId, type, id, q);
    if (!cur) throw new CustosError('NOT_FOUND');
    // Deleting a deleted resource is idempotent: no new version.
    return {
      status: 204,
      versions: cur.deleted
        ? [cur]
        : await this.writeVersion(q, { type, id, method: 'delete', resource: undefined }),
    };
  }

  /** What a search may see: this project, the types the caller's access covers. */
  private searchAccess(patient?: string): SearchAccess {
    const ctl = this.accessCtl;
    if (!ctl)
      return {
        projectId: this.principal.projectId,
        canRead: (t) => this.principal.can(t, 'r') || this.principal.can(t, 's'),
        patient,
        baseUrl: this.deps.fhirBaseUrl ?? '',
        now: this.now(),
      };
    // A person: the policy and scope predicates go into the SQL. Matches need search access to their
    // type; what is read through includes, chains and _has needs read (or search) access.
    const read = (t: string) => or(ctl.predicate(t, 'r'), ctl.predicate(t, 's'));
    return {
      projectId: this.principal.projectId,
      canRead: (t) => t !== 'AuditEvent' && read(t).op !== 'false',
      patient,
      baseUrl: this.deps.fhirBaseUrl ?? '',
      now: this.now(),
      predicate: (t, use) => (use === 'match' ? ctl.predicate(t, 's') : read(t)),
    };
  }

  /** Ids matching conditional-interaction criteria, through the search engine (at most 2 needed). */
  private async findIds(q: SqlQueryable, type: string, criteria: URLSearchParams): Promise<string[]> {
    let req: SearchRequest;
    try {
      req = parseSearch([type], criteria, { strict: true });
    } catch (e) {
      if (isCustosError(e) && e.code === 'SEARCH_UNKNOWN_PARAMETER')
        throw new CustosError('UNSUPPORTED_CONDITION');
      throw e;
    }
    if (req.filters.length === 0) throw new CustosError('UNSUPPORTED_CONDITION');
    const access = this.searchAccess();
    const enc = this.deps.encryption;
    const keys = this.keys;
    if (enc && keys)
      access.protection = {
        classOf: (t, c) => this.deps.protectedParams?.classOf(t, c),
        blind: (k) => blindIndexKey(keys.blindKey, enc.envelope.blindBits, k),
      };
    const checks: BlindCheck[] = [];
    // With blind-index criteria, a few more candidates than needed, each verified after decryption.
    const ids = await searchIds(q, req, access, 50, checks);
    if (checks.length === 0) return ids.slice(0, 2);
    const visible = this.visible();
    if (checks.some((c) => !visible.has(c.cls))) throw new CustosError('SEARCH_PROTECTED');
    const confirmed: string[] = [];
    for (const id of ids) {
      const v = await this.deps.store.read(this.principal.projectId, type, id, q);
      if (!v?.json) continue;
      const full = await this.reveal(v, q);
      if (passesBlindChecks({ ...full, json: full.json!, keys: [] }, checks, this.deps.fhirBaseUrl))
        confirmed.push(id);
      if (confirmed.length === 2) break;
    }
    return confirmed;
  }

  /** The advisory-lock key of a condition: concurrent identical conditional writes serialize on it. */
  private conditionKey(type: string, criteria: URLSearchParams): string {
    return `${this.principal.projectId}|${type}|${[...criteria]
      .map(([k, v]) => `${k}=${v}`)
      .sort()
      .join('&')}`;
  }

  private static result(step: StepResult): InteractionResult {
    return { status: step.status, version: step.versions[0], existing: step.existing };
  }

  /** The result of a committed write step, its resource revealed for the caller. */
  private async revealed(r: InteractionResult): Promise<InteractionResult> {
    return r.version ? { ...r, version: await this.reveal(r.version) } : r;
  }

  async create(type: string, body: unknown, opts: WriteOptions = {}): Promise<InteractionResult> {
    await this.guard('create', type, 'c');
    const resource = await this.checkBody(type, body, undefined);
    const criteria = opts.ifNoneExist !== undefined ? parseCriteria(opts.ifNoneExist) : undefined;
    const step = await this.audited('create', { type }, () =>
      this.deps.store.db.transaction((q) => this.createIn(q, type, resource, criteria)),
    );
    return this.revealed(PhiSession.result(step));
  }

  async update(type: string, id: string, body: unknown, opts: WriteOptions = {}): Promise<InteractionResult> {
    await this.guard('update', type, 'u', id);
    const resource = await this.checkBody(type, body, id);
    if (resource.id === undefined) throw new CustosError('ID_MISMATCH');
    const step = await this.audited('update', { type, id }, () =>
      this.deps.store.db.transaction((q) => this.updateIn(q, type, id, resource, opts.ifMatch)),
    );
    return this.revealed(PhiSession.result(step));
  }

  async conditionalUpdate(type: string, query: string, body: unknown): Promise<InteractionResult> {
    await this.guard('update', type, 'u');
    const resource = await this.checkBody(type, body, undefined, 'update');
    const criteria = parseCriteria(query);
    const step = await this.audited('update', { type }, () =>
      this.deps.store.db.transaction((q) => this.conditionalUpdateIn(q, type, criteria, resource)),
    );
    return this.revealed(PhiSession.result(step));
  }

  async patch(
    type: string,
    id: string,
    operations: unknown,
    opts: WriteOptions = {},
  ): Promise<InteractionResult> {
    await this.guard('patch', type, 'u', id);
    if (!Array.isArray(operations)) throw new CustosError('INVALID_PATCH');
    const step = await this.audited('patch', { type, id }, () =>
      this.deps.store.db.transaction((q) => this.patchIn(q, type, id, operations, opts.ifMatch)),
    );
    return this.revealed(PhiSession.result(step));
  }

  async delete(type: string, id: string): Promise<InteractionResult> {
    await this.guard('delete', type, 'd', id);
    const step = await this.audited('delete', { type, id }, () =>
      this.deps.store.db.transaction((q) => this.deleteIn(q, type, id)),
    );
    return this.revealed(PhiSession.result(step));
  }

  // ---- batch and transaction --------------------------------------------------------------

  /**
   * A batch: each entry is an independent interaction with its own audit records; one failing
   * entry does not affect the others (https://hl7.org/fhir/R4/http.html#brules).
   */
  async batch(baseUrl: string, bundle: unknown): Promise<InteractionResult> {
    const entries = bundleEntries(bundle, 'batch');
    const responses: string[] = [];
    for (const [i, entry] of entries.entries()) {
      const sub = new PhiSession(this.deps, this.principal, {
        ...this.facts,
        requestId: `${this.facts.requestId}-${i}`,
      });
      try {
        responses.push(entryResponse(baseUrl, await sub.dispatch(baseUrl, entry)));
      } catch (e) {
        const code: ErrorCode = isCustosError(e) ? e.code : 'INTERNAL';
        if (!isCustosError(e))
          this.deps.log.error('batch.entry_failed', { requestId: sub.facts.requestId, ...errorFields(e) });
        responses.push(
          `{"response":{"status":"${statusOf(code)}","outcome":${operationOutcomeJson(code, isCustosError(e) ? e.details : [])}}}`,
        );
      }
    }
    return {
      status: 200,
      body: `{"resourceType":"Bundle","type":"batch-response","entry":[${responses.join(',')}]}`,
    };
  }

  /** One interaction described by a bundle entry. */
  private async dispatch(baseUrl: string, entry: BundleEntry): Promise<InteractionResult> {
    const { method, path, query } = parseEntryRequest(entry);
    const [type, id, hist, vid] = path;
    const ifMatch = parseIfMatch(entry.request?.ifMatch);
    if (method === 'GET' && type && id && !hist) return this.read(type, id);
    if (method === 'GET' && type && id && hist === '_history' && vid) return this.vread(type, id, vid);
    if (method === 'GET' && type && (id === '_history' || hist === '_history')) {
      return this.history(baseUrl, { type, id: id === '_history' ? undefined : id });
    }
    if (method === 'POST' && type && !id)
      return this.create(type, entry.resource, { ifNoneExist: entry.request?.ifNoneExist });
    if (method === 'PUT' && type && id && !hist) return this.update(type, id, entry.resource, { ifMatch });
    if (method === 'PUT' && type && !id && query) return this.conditionalUpdate(type, query, entry.resource);
    if (method === 'PATCH' && type && id)
      return this.patch(type, id, binaryPatch(entry.resource), { ifMatch });
    if (method === 'DELETE' && type && id && !hist) return this.delete(type, id);
    throw new CustosError('INVALID_BUNDLE');
  }

  /**
   * A transaction: all entries succeed or none is committed. `urn:uuid:` full URLs are given
   * server ids and references to them are rewritten; conditional references (`Patient?identifier=…`)
   * are resolved; entries run in the order DELETE, POST, PUT/PATCH, GET
   * (https://hl7.org/fhir/R4/http.html#trules). One attempt and one outcome are audited.
   */
  async transaction(baseUrl: string, bundle: unknown): Promise<InteractionResult> {
    const entries = bundleEntries(bundle, 'transaction');
    const plans = entries.map((entry, index) => ({ entry, index, ...parseEntryRequest(entry) }));
    // Authorize every entry before anything is written; a refusal refuses the whole transaction.
    for (const p of plans) {
      const type = p.path[0] ?? '';
      const interaction: Interaction =
        p.method === 'GET' ? 'r' : p.method === 'POST' ? 'c' : p.method === 'DELETE' ? 'd' : 'u';
      // The id is checked too: a transaction must not store (or audit) an id that is not a FHIR id.
      const id = p.path[1];
      await this.guard(
        'transaction',
        type,
        interaction,
        id !== undefined && id !== '_history' ? id : undefined,
      );
    }
    // Assign ids to creates and build the urn:uuid map before any write.
    const idMap = new Map<string, string>();
    for (const p of plans) {
      if (p.method === 'POST' && p.entry.fullUrl?.startsWith('urn:uuid:')) {
        if (idMap.has(p.entry.fullUrl)) throw new CustosError('INVALID_BUNDLE');
        idMap.set(p.entry.fullUrl, `${p.path[0]}/${newId()}`);
      }
    }
    const order = { DELETE: 0, POST: 1, PUT: 2, PATCH: 2, GET: 3 } as Record<string, number>;
    const sorted = [...plans].sort(
      (a, b) => (order[a.method] ?? 9) - (order[b.method] ?? 9) || a.index - b.index,
    );
    const store = this.deps.store;
    const projectId = this.principal.projectId;
    const results: { index: number; result: InteractionResult }[] = [];
    const reads: { index: number; type: string; id: string }[] = [];
    await this.audited('transaction', { type: 'Bundle' }, () =>
      store.db.transaction(async (raw) => {
        // Creates with fresh ids are queued and inserted in one statement: before any other query
        // of this transaction (so every read sees them) and before the commit.
        const buffer: StoredVersion[] = [];
        const flush = async () => {
          if (buffer.length > 0) await store.insertFresh(raw, projectId, buffer.splice(0));
        };
        const q: SqlQueryable = {
          query: async (sql, params) => {
            await flush();
            return raw.query(sql, params);
          },
        };
        this.freshBuffer = buffer;
        const written: StoredVersion[] = [];
        try {
          // Conditional references are resolved inside the transaction, against committed data.
          const resolveConditional = async (ref: string): Promise<string> => {
            const m = /^([A-Z][A-Za-z]+)\?(.+)$/.exec(ref);
            if (!m) return ref;
            if (!this.deps.isResourceType(m[1]!)) throw new CustosError('UNKNOWN_RESOURCE_TYPE');
            const ids = await this.findIds(q, m[1]!, parseCriteria(m[2]!));
            if (ids.length !== 1)
              throw new CustosError(ids.length === 0 ? 'NOT_FOUND' : 'CONDITIONAL_MULTIPLE');
            return `${m[1]}/${ids[0]}`;
          };
          for (const p of sorted) {
            const [type = '', id, hist] = p.path;
            const body =
              p.entry.resource === undefined
                ? undefined
                : await rewriteReferences(p.entry.resource, idMap, resolveConditional);
            let step: StepResult;
            if (p.method === 'GET' && id && !hist) {
              reads.push({ index: p.index, type, id });
              continue;
            } else if (p.method === 'DELETE' && id && !hist) {
              step = await this.deleteIn(q, type, id);
            } else if (p.method === 'POST' && !id) {
              const resource = await this.checkBody(type, body, undefined, 'transaction');
              const criteria = p.entry.request?.ifNoneExist
                ? parseCriteria(p.entry.request.ifNoneExist)
                : undefined;
              const planned = p.entry.fullUrl ? idMap.get(p.entry.fullUrl) : undefined;
              step = await this.createIn(
                q,
                type,
                resource,
                criteria,
                planned ? planned.slice(type.length + 1) : undefined,
              );
              // A conditional create that matched: later references to its urn:uuid point at the match.
              if (step.existing && p.entry.fullUrl && step.versions[0])
                idMap.set(p.entry.fullUrl, `${type}/${step.versions[0].id}`);
            } else if (p.method === 'PUT' && id && !hist) {
              step = await this.updateIn(
                q,
                type,
                id,
                await this.checkBody(type, body, id, 'transaction'),
                parseIfMatch(p.entry.request?.ifMatch),
              );
            } else if (p.method === 'PUT' && !id && p.query) {
              step = await this.conditionalUpdateIn(
                q,
                type,
                parseCriteria(p.query),
                await this.checkBody(type, body, undefined, 'transaction'),
              );
            } else if (p.method === 'PATCH' && id) {
              step = await this.patchIn(
                q,
                type,
                id,
                binaryPatch(body),
                parseIfMatch(p.entry.request?.ifMatch),
              );
            } else {
              throw new CustosError('INVALID_BUNDLE');
            }
            written.push(...step.versions);
            results.push({ index: p.index, result: PhiSession.result(step) });
          }
        } finally {
          this.freshBuffer = undefined;
        }
        await flush();
        return { versions: written };
      }),
    );
    // GET entries run after the commit, each as an audited read.
    for (const r of reads) {
      try {
        results.push({ index: r.index, result: await this.read(r.type, r.id) });
      } catch (e) {
        if (!isCustosError(e) || e.code === 'AUDIT_UNAVAILABLE') throw e;
        results.push({ index: r.index, result: { status: e.status } });
      }
    }
    for (const r of results) r.result = await this.revealed(r.result);
    results.sort((a, b) => a.index - b.index);
    const body = `{"resourceType":"Bundle","type":"transaction-response","entry":[${results.map((r) => entryResponse(baseUrl, r.result)).join(',')}]}`;
    return { status: 200, body };
  }
}

// ---- helpers (pure) ------------------------------------------------------------------------

/** The keyset cursor of a history page: [lastUpdated, type, id, versionId], base64url JSON. Anything else is a 400. */
function decodeHistoryCursor(cursor: string, isResourceType: (t: string) => boolean) {
  let c: unknown;
  try {
    c = JSON.parse(Buffer.from(cursor, 'base64url').toString('utf8'));
  } catch {
    throw new CustosError('BAD_REQUEST');
  }
  if (
    !Array.isArray(c) ||
    c.length !== 4 ||
    typeof c[0] !== 'string' ||
    !/^\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}(\.\d{1,6})?Z$/.test(c[0]) ||
    typeof c[1] !== 'string' ||
    !isResourceType(c[1]) ||
    typeof c[2] !== 'string' ||
    !isFhirId(c[2]) ||
    !Number.isInteger(c[3]) ||
    (c[3] as number) < 1
  ) {
    throw new CustosError('BAD_REQUEST');
  }
  return { lastUpdated: c[0], type: c[1], id: c[2], versionId: c[3] as number };
}

function hasTestLabel(r: Record<string, unknown>): boolean {
  const security = (r.meta as { security?: unknown } | undefined)?.security;
  return (
    Array.isArray(security) &&
    security.some(
      (c) =>
        c &&
        (c as { system?: unknown }).system === HTEST.system &&
        (c as { code?: unknown }).code === HTEST.code,
    )
  );
}

function parseCriteria(query: string): URLSearchParams {
  const q = query.startsWith('?')
    ? query.slice(1)
    : query.includes('?')
      ? query.slice(query.indexOf('?') + 1)
      : query;
  const p = new URLSearchParams(q);
  if ([...p].length === 0) throw new CustosError('UNSUPPORTED_CONDITION');
  return p;
}

function parseIfMatch(v: string | undefined): number | undefined {
  if (v === undefined) return undefined;
  const m = /^(?:W\/)?"(\d{1,9})"$/.exec(v.trim());
  if (!m) throw new CustosError('VERSION_CONFLICT');
  return Number(m[1]);
}

export { parseIfMatch };

function bundleEntries(bundle: unknown, type: 'batch' | 'transaction'): BundleEntry[] {
  const b = bundle as { resourceType?: unknown; type?: unknown; entry?: unknown } | null;
  if (!b || b.resourceType !== 'Bundle' || b.type !== type) throw new CustosError('INVALID_BUNDLE');
  if (b.entry === undefined) return [];
  if (!Array.isArray(b.entry) || b.entry.some((e) => !e || typeof e !== 'object'))
    throw new CustosError('INVALID_BUNDLE');
  return b.entry as BundleEntry[];
}

function parseEntryRequest(entry: BundleEntry): { method: string; path: string[]; query: string } {
  const method = entry.request?.method;
  const url = entry.request?.url;
  if (typeof method !== 'string' || typeof url !== 'string') throw new CustosError('INVALID_BUNDLE');
  const qi = url.indexOf('?');
  const pathText = (qi < 0 ? url : url.slice(0, qi)).replace(/^\/+|\/+$/g, '');
  return {
    method: method.toUpperCase(),
    path: pathText ? pathText.split('/') : [],
    query: qi < 0 ? '' : url.slice(qi + 1),
  };
}

/** In a bundle, a JSON Patch travels as a Binary whose data is the base64 patch document. */
function binaryPatch(resource: unknown): unknown {
  const r = resource as { resourceType?: unknown; data?: unknown } | undefined;
  if (r?.resourceType === 'Binary' && typeof r.data === 'string') {
    try {
      return JSON.parse(Buffer.from(r.data, 'base64').toString('utf8'));
    } catch {
      throw new CustosError('INVALID_PATCH');
    }
  }
  if (r?.resourceType === 'Parameters') throw new CustosError('INVALID_PATCH'); // FHIRPath Patch: not supported
  return resource;
}

async function rewriteReferences(
  resource: Record<string, unknown>,
  idMap: Map<string, string>,
  resolveConditional: (ref: string) => Promise<string>,
): Promise<Record<string, unknown>> {
  const copy = structuredClone(resource);
  const stack: unknown[] = [copy];
  while (stack.length > 0) {
    const node = stack.pop();
    if (Array.isArray(node)) stack.push(...node);
    else if (node && typeof node === 'object') {
      const o = node as Record<string, unknown>;
      for (const [k, v] of Object.entries(o)) {
        if (k === 'reference' && typeof v === 'string') {
          const mapped = idMap.get(v);
          if (mapped) o[k] = mapped;
          else if (v.includes('?')) o[k] = await resolveConditional(v);
        } else if (v && typeof v === 'object') stack.push(v);
      }
    }
  }
  return copy;
}

function statusOf(code: ErrorCode): string {
  return String(new CustosError(code).status);
}

/** OperationOutcome JSON for an error code (our fixed text, plus per-issue details). */
export function operationOutcomeJson(
  code: ErrorCode,
  details: readonly IssueDetail[] = [],
  correlationId?: string,
): string {
  const e = new CustosError(code);
  const issue = (details.length > 0 ? details : [{ severity: 'error' as const, code: '' }]).map((d) => ({
    severity: d.severity,
    code: d.code || ERROR_CATALOG[code].issue,
    details: { coding: [{ system: 'urn:custos:error', code }], text: e.message },
    diagnostics: d.diagnostics ?? (correlationId ? `correlation id ${correlationId}` : undefined),
    expression: d.expression ? [d.expression] : undefined,
  }));
  return JSON.stringify({ resourceType: 'OperationOutcome', issue });
}

function entryResponse(baseUrl: string, r: InteractionResult): string {
  const v = r.version;
  if (r.body) return `{"resource":${r.body},"response":{"status":"${r.status}"}}`;
  if (!v) return `{"response":{"status":"${r.status}"}}`;
  const location = `${v.resourceType}/${v.id}/_history/${v.versionId}`;
  const response = JSON.stringify({
    status: `${r.status}${r.status === 201 ? ' Created' : r.status === 200 ? ' OK' : ''}`,
    location: r.status === 201 ? location : undefined,
    etag: `W/"${v.versionId}"`,
    lastModified: v.lastUpdated,
  });
  const resource = v.json && r.status !== 204 ? `"resource":${v.json},` : '';
  return `{"fullUrl":${JSON.stringify(`${baseUrl}/${v.resourceType}/${v.id}`)},${resource}"response":${response}}`;
}

/**
 * Blind-index matches can be false positives (the index is truncated on purpose): a decrypted
 * match must carry one of the plain keys of each such criterion (or none, for `:not`).
 */
function passesBlindChecks(
  row: SearchRow,
  checks: readonly BlindCheck[],
  baseUrl: string | undefined,
): boolean {
  const mine = checks.filter((c) => c.resourceType === row.resourceType);
  if (mine.length === 0) return true;
  // A plain key in the stored index (row.keys holds the checks' plain keys it has) came from an
  // unprotected element, which decryption leaves as it is: it decides its check without re-indexing.
  const stored = new Set(row.keys);
  const decided = (c: BlindCheck) => c.keys.some((k) => stored.has(k));
  if (mine.some((c) => c.negate && decided(c))) return false;
  const open = mine.filter((c) => !decided(c));
  if (open.length === 0) return true;
  const keys = new Set(extractSearchIndex(JSON.parse(row.json) as Record<string, unknown>, baseUrl).keys);
  return open.every((c) => c.keys.some((k) => keys.has(k)) !== c.negate);
}

/** The searchset Bundle of a page, built as text around the stored JSON of each resource. */
function searchBundle(
  baseUrl: string,
  path: string,
  query: URLSearchParams,
  req: SearchRequest,
  page: Awaited<ReturnType<typeof runSearch>>,
  unknownElementNames: string[],
): string {
  const link = (cursor: string | undefined) => {
    const qs = new URLSearchParams([...query].filter(([k]) => k !== '_cursor'));
    if (cursor !== undefined) qs.set('_cursor', cursor);
    const s = qs.toString();
    return `${baseUrl}${path}${s ? `?${s}` : ''}`;
  };
  const links = [{ relation: 'self', url: link(req.cursor) }];
  if (page.next) links.push({ relation: 'next', url: link(page.next) });
  if (page.previous) links.push({ relation: 'previous', url: link(page.previous) });
  const shape = (row: SearchRow): string => {
    if (req.elements) return JSON.stringify(selectElements(JSON.parse(row.json), req.elements));
    if (req.summary === 'true' || req.summary === 'text' || req.summary === 'data')
      return JSON.stringify(summarize(JSON.parse(row.json), req.summary));
    return row.json;
  };
  const entry = (row: SearchRow, mode: 'match' | 'include') =>
    `{"fullUrl":${JSON.stringify(`${baseUrl}/${row.resourceType}/${row.id}`)},"resource":${shape(row)},"search":{"mode":"${mode}"}}`;
  const issues = [
    ...req.ignored,
    ...page.warnings,
    ...unknownElementNames.map((n) => ({
      severity: 'warning' as const,
      code: 'not-supported',
      diagnostics: `_elements names '${n}', which is not an element of the searched type.`,
    })),
  ];
  const entries = [
    ...page.matches.map((r) => entry(r, 'match')),
    ...page.includes.map((r) => entry(r, 'include')),
  ];
  if (issues.length > 0)
    entries.push(
      `{"resource":${JSON.stringify({ resourceType: 'OperationOutcome', issue: issues })},"search":{"mode":"outcome"}}`,
    );
  const total = page.total === undefined ? '' : `"total":${page.total},`;
  return `{"resourceType":"Bundle","type":"searchset",${total}"link":${JSON.stringify(links)},"entry":[${entries.join(',')}]}`;
}
