import { CustosError, isCustosError } from '../kernel/errors.ts';
import { newId } from '../kernel/ids.ts';
import type { SqlDriver, SqlQueryable } from '../store/sql-driver.ts';
import type { AuditLog } from '../audit/audit-log.ts';
import { adminEvent } from '../audit/audit-event.ts';
import { parseSearch } from '../fhir/search-request.ts';
import { indexKey } from '../fhir/search-index.ts';
import { criterionKeys, type AccessPredicate } from '../store/search-sql.ts';
import type { SmartScope } from '../auth/smart-scopes.ts';
import { ALL_CLASSES, type SensitivityClass } from '../crypto/protection-policy.ts';
import { BREAK_GLASS_PURPOSES, PURPOSES_OF_USE } from './purpose-of-use.ts';
import type { Interaction, Principal } from './gateway.ts';

/**
 * Access policies (issue 6, docs/access-policies.md, ADR 0010): what a person's role lets them do,
 * on which resources, for which purposes, and what they see of them (minimum necessary).
 *
 * The effective permission of a person's request is the intersection of
 * - the role policy of the project (allow and deny rules on types and interactions, narrowed by
 *   search criteria and a compartment; the purposes the role may claim; the classes it may see),
 * - the token's SMART scopes (already within the client's registration): `patient/` scopes confine
 *   to the launch patient's compartment, granular scopes (`?category=laboratory`) add criteria,
 * - the purpose of use (which classes it reveals: minimum-necessary.ts).
 *
 * Each becomes an `AccessPredicate` over what the store keeps of every version (its compartment
 * membership and its exact index keys): compiled into the search SQL (search-sql.ts) and evaluated
 * in memory on one version (read, vread, history, writes, transaction entries), so both agree.
 * System clients (no person) are not subject to role policies: their scopes decide, as before.
 */

export const USER_ROLES = ['practitioner', 'patient', 'admin', 'auditor'] as const;
export type UserRole = (typeof USER_ROLES)[number];

/** One rule of a role policy. */
export interface AccessRule {
  effect: 'allow' | 'deny';
  /** Resource types, or `*` for every type except AuditEvent (which must be named). */
  types: string[];
  /** A subset of `cruds` (create, read, update, delete, search). */
  interactions: string;
  /**
   * FHIR search criteria the resource must match (`category=laboratory`): token, reference or uri
   * parameters, plain or `:not`, values ORed with commas, parameters ANDed. Only with one type.
   */
  criteria?: string;
  /**
   * `own`: the compartment of the person's own Patient (`fhirUser`); `care-team`: the compartments
   * of the patients whose `generalPractitioner` is the person's Practitioner, or of whose CareTeam
   * the Practitioner is a `participant` (lifted by break-glass).
   */
  compartment?: 'own' | 'care-team';
}

/** The policy of one role in one project. */
export interface RolePolicy {
  rules: AccessRule[];
  /** Purposes of use the role may claim (within those of the client). */
  purposes: string[];
  /** Sensitivity classes the role may ever see (intersected with the purpose's); absent: all. */
  visibleClasses?: SensitivityClass[];
  /** Whether the role may break glass (ETREAT with a reason). */
  breakGlass: boolean;
  /** Length of a break-glass grant, minutes (default: the server's, 60). */
  breakGlassMinutes?: number;
}

/** Resource types that are not about one patient (directories, definitions). */
export const DIRECTORY_TYPES = [
  'Practitioner',
  'PractitionerRole',
  'Organization',
  'Location',
  'HealthcareService',
  'Endpoint',
  'Medication',
  'Questionnaire',
];

/**
 * Built-in defaults, used for a role until a project sets its own policy (docs/access-policies.md).
 */
export const DEFAULT_POLICIES: Readonly<Record<UserRole, RolePolicy>> = Object.freeze({
  practitioner: {
    rules: [
      { effect: 'allow', types: ['*'], interactions: 'cruds', compartment: 'care-team' },
      { effect: 'allow', types: DIRECTORY_TYPES, interactions: 'rs' },
    ],
    purposes: ['TREAT', 'CAREMGT', 'PATSFTY', 'COC'],
    breakGlass: true,
  },
  patient: {
    rules: [
      { effect: 'allow', types: ['*'], interactions: 'rs', compartment: 'own' },
      {
        effect: 'allow',
        types: ['QuestionnaireResponse', 'Observation', 'Communication'],
        interactions: 'cu',
        compartment: 'own',
      },
      { effect: 'allow', types: DIRECTORY_TYPES, interactions: 'rs' },
    ],
    purposes: ['PATRQT'],
    breakGlass: false,
  },
  admin: {
    rules: [{ effect: 'allow', types: DIRECTORY_TYPES, interactions: 'cruds' }],
    purposes: ['HOPERAT', 'HSYSADMIN', 'RECORDMGT'],
    visibleClasses: [],
    breakGlass: false,
  },
  auditor: {
    rules: [{ effect: 'allow', types: ['AuditEvent', 'Provenance'], interactions: 'rs' }],
    purposes: ['HCOMPL', 'HLEGAL'],
    visibleClasses: [],
    breakGlass: false,
  },
});

/** Default length of a break-glass grant, minutes, unless the role policy sets `breakGlassMinutes`. */
export const DEFAULT_BREAK_GLASS_MINUTES = 60;

// ---- predicates --------------------------------------------------------------------------

export const TRUE: AccessPredicate = { op: 'true' };
export const FALSE: AccessPredicate = { op: 'false' };

/** The operands without repeats (a `patient/` scope and an `own` rule often give the same one twice). */
function distinct(of: AccessPredicate[]): AccessPredicate[] {
  const seen = new Set<string>();
  return of.filter((p) => {
    const k = JSON.stringify(p);
    return seen.has(k) ? false : (seen.add(k), true);
  });
}

export function and(...of: AccessPredicate[]): AccessPredicate {
  if (of.some((p) => p.op === 'false')) return FALSE;
  const rest = distinct(of.filter((p) => p.op !== 'true'));
  return rest.length === 0 ? TRUE : rest.length === 1 ? rest[0]! : { op: 'and', of: rest };
}
export function or(...of: AccessPredicate[]): AccessPredicate {
  if (of.some((p) => p.op === 'true')) return TRUE;
  const rest = distinct(of.filter((p) => p.op !== 'false'));
  return rest.length === 0 ? FALSE : rest.length === 1 ? rest[0]! : { op: 'or', of: rest };
}
export function not(p: AccessPredicate): AccessPredicate {
  return p.op === 'true' ? FALSE : p.op === 'false' ? TRUE : { op: 'not', of: p };
}
function patientsPred(ids: readonly string[]): AccessPredicate {
  return ids.length === 0 ? FALSE : { op: 'patients', ids };
}

/** What a predicate is evaluated on in memory: one stored version. */
export interface VersionFacts {
  patients: readonly string[];
  /** The exact index keys of the version as stored (computed only when a predicate needs them). */
  keys: () => ReadonlySet<string>;
}

/** The in-memory twin of `predicateSql` (search-sql.ts). */
export function evaluate(pred: AccessPredicate, facts: VersionFacts): boolean {
  switch (pred.op) {
    case 'true':
      return true;
    case 'false':
      return false;
    case 'patients':
      return pred.ids.some((id) => facts.patients.includes(id));
    case 'keys': {
      const keys = facts.keys();
      return pred.keys.some((k) => keys.has(k));
    }
    case 'and':
      return pred.of.every((p) => evaluate(p, facts));
    case 'or':
      return pred.of.some((p) => evaluate(p, facts));
    case 'not':
      return !evaluate(pred.of, facts);
  }
}

const criteriaCache = new Map<string, AccessPredicate>();

/**
 * The predicate of search criteria on `type` (`category=laboratory&status:not=cancelled`).
 * Throws SEARCH_INVALID for criteria that are not exact token, reference or uri criteria.
 */
export function criteriaPredicate(type: string, criteria: string, baseUrl = ''): AccessPredicate {
  const key = `${type}?${criteria}|${baseUrl}`;
  const cached = criteriaCache.get(key);
  if (cached) return cached;
  const req = parseSearch([type], new URLSearchParams(criteria), { strict: true });
  if (req.filters.length === 0 || [...new URLSearchParams(criteria).keys()].some((k) => k.startsWith('_')))
    throw new CustosError('SEARCH_INVALID', [
      {
        severity: 'error',
        code: 'invalid',
        diagnostics: 'Access criteria need at least one search parameter and no control parameters.',
      },
    ]);
  const pred = and(
    ...req.filters.map((f) => {
      const { keys, negate } = criterionKeys(f, baseUrl);
      const p: AccessPredicate = keys.length === 0 ? FALSE : { op: 'keys', keys };
      return negate ? not(p) : p;
    }),
  );
  if (criteriaCache.size > 10_000) criteriaCache.clear();
  criteriaCache.set(key, pred);
  return pred;
}

// ---- validation --------------------------------------------------------------------------

function policyInvalid(diagnostics: string): never {
  throw new CustosError('POLICY_INVALID', [{ severity: 'error', code: 'invalid', diagnostics }]);
}

/**
 * Checks a policy document (from the admin API or CLI) and returns it normalized. Messages name the
 * rule and the problem; criteria are compiled once to prove they are supported.
 */
export function validatePolicy(input: unknown, isResourceType: (t: string) => boolean): RolePolicy {
  const o = input as Record<string, unknown> | null;
  if (!o || typeof o !== 'object' || Array.isArray(o)) policyInvalid('A policy is a JSON object.');
  const allowedKeys = new Set(['rules', 'purposes', 'visibleClasses', 'breakGlass', 'breakGlassMinutes']);
  for (const k of Object.keys(o))
    if (!allowedKeys.has(k)) policyInvalid(`Unknown policy field '${k.slice(0, 40)}'.`);
  if (!Array.isArray(o.rules) || o.rules.length > 200)
    policyInvalid('rules must be an array of at most 200 rules.');
  const rules: AccessRule[] = o.rules.map((r: unknown, i: number) => {
    const x = r as Record<string, unknown> | null;
    if (!x || typeof x !== 'object') policyInvalid(`Rule ${i} is not an object.`);
    for (const k of Object.keys(x))
      if (!['effect', 'types', 'interactions', 'criteria', 'compartment'].includes(k))
        policyInvalid(`Rule ${i} has an unknown field.`);
    if (x.effect !== 'allow' && x.effect !== 'deny')
      policyInvalid(`Rule ${i}: effect must be allow or deny.`);
    if (!Array.isArray(x.types) || x.types.length === 0 || x.types.length > 200)
      policyInvalid(`Rule ${i}: types must be a non-empty array.`);
    for (const t of x.types)
      if (typeof t !== 'string' || (t !== '*' && !isResourceType(t)))
        policyInvalid(`Rule ${i}: an entry of types is not a resource type.`);
    if (typeof x.interactions !== 'string' || !/^c?r?u?d?s?$/.test(x.interactions) || x.interactions === '')
      policyInvalid(`Rule ${i}: interactions must be a subset of cruds, in that order.`);
    if (x.compartment !== undefined && x.compartment !== 'own' && x.compartment !== 'care-team')
      policyInvalid(`Rule ${i}: compartment must be own or care-team.`);
    if (x.criteria !== undefined) {
      if (typeof x.criteria !== 'string' || x.criteria.length > 1000)
        policyInvalid(`Rule ${i}: criteria must be a search query string.`);
      if (x.types.length !== 1 || x.types[0] === '*')
        policyInvalid(`Rule ${i}: criteria need exactly one type.`);
      try {
        criteriaPredicate(x.types[0] as string, x.criteria.replace(/^\?/, ''));
      } catch (e) {
        if (!isCustosError(e)) throw e;
        policyInvalid(`Rule ${i}: ${e.details[0]?.diagnostics ?? 'the criteria are not supported.'}`);
      }
    }
    return {
      effect: x.effect,
      types: [...(x.types as string[])],
      interactions: x.interactions,
      criteria: typeof x.criteria === 'string' ? x.criteria.replace(/^\?/, '') : undefined,
      compartment: x.compartment as AccessRule['compartment'],
    };
  });
  if (!Array.isArray(o.purposes) || o.purposes.some((p) => typeof p !== 'string' || !PURPOSES_OF_USE.has(p)))
    policyInvalid('purposes must be an array of purpose of use codes.');
  if (o.purposes.some((p) => BREAK_GLASS_PURPOSES.has(p as string)))
    policyInvalid('Break-glass purposes are not listed in purposes: set breakGlass instead.');
  if (
    o.visibleClasses !== undefined &&
    (!Array.isArray(o.visibleClasses) ||
      o.visibleClasses.some((c) => !ALL_CLASSES.includes(c as SensitivityClass)))
  )
    policyInvalid(`visibleClasses must be an array of: ${ALL_CLASSES.join(', ')}.`);
  if (typeof o.breakGlass !== 'boolean') policyInvalid('breakGlass must be true or false.');
  if (
    o.breakGlassMinutes !== undefined &&
    (!Number.isInteger(o.breakGlassMinutes) ||
      (o.breakGlassMinutes as number) < 1 ||
      (o.breakGlassMinutes as number) > 1440)
  )
    policyInvalid('breakGlassMinutes must be an integer from 1 to 1440.');
  return {
    rules,
    purposes: [...new Set(o.purposes as string[])],
    visibleClasses: o.visibleClasses as SensitivityClass[] | undefined,
    breakGlass: o.breakGlass,
    breakGlassMinutes: o.breakGlassMinutes as number | undefined,
  };
}

// ---- the effective access of one request ---------------------------------------------------

const PATIENT_ID = /^Patient\/([A-Za-z0-9\-.]{1,64})$/;
const PRACTITIONER_ID = /^Practitioner\/([A-Za-z0-9\-.]{1,64})$/;

/** The Patient id of a patient user (`fhirUser` `Patient/123`), if any. */
export function ownPatientOf(principal: Pick<Principal, 'userRole' | 'fhirUser'>): string | undefined {
  return principal.userRole === 'patient' ? PATIENT_ID.exec(principal.fhirUser ?? '')?.[1] : undefined;
}

/** The Practitioner id of a person (`fhirUser` `Practitioner/abc`), if any. */
export function practitionerOf(principal: Pick<Principal, 'fhirUser'>): string | undefined {
  return PRACTITIONER_ID.exec(principal.fhirUser ?? '')?.[1];
}

/** Whether any rule of `policy` narrows to the care team (a query is then needed to resolve it). */
export function needsCareTeam(policy: RolePolicy): boolean {
  return policy.rules.some((r) => r.compartment === 'care-team');
}

/** At most this many patients in a practitioner's care team (resolved per request). */
export const MAX_CARE_TEAM = 10_000;

/**
 * The patients of a practitioner's care (docs/access-policies.md): Patients whose
 * `generalPractitioner` is the Practitioner, and the patients of CareTeams in which the Practitioner
 * is a `participant`. From the search index, one statement.
 */
export async function careTeamPatients(
  q: SqlQueryable,
  projectId: string,
  practitionerId: string,
): Promise<string[]> {
  const ref = `Practitioner/${practitionerId}`;
  const r = await q.query<{ id: string }>(
    `SELECT id FROM resource WHERE project_id = $1 AND resource_type = 'Patient' AND NOT deleted
        AND search_keys @> $2::text[]
     UNION
     SELECT unnest(patients) FROM resource WHERE project_id = $1 AND resource_type = 'CareTeam' AND NOT deleted
        AND search_keys @> $3::text[]
     LIMIT ${MAX_CARE_TEAM}`,
    [projectId, [indexKey('general-practitioner', ref)], [indexKey('participant', ref)]],
  );
  return r.rows.map((x) => x.id).sort();
}

/**
 * The effective access of one person's request: per resource type and interaction, the predicate
 * a version must satisfy (FALSE: the type is out of reach). Built once per request, after the
 * policy and the care team are loaded; everything here is synchronous.
 */
export class AccessControl {
  private readonly cache = new Map<
    string,
    { scope: AccessPredicate; role: AccessPredicate; all: AccessPredicate }
  >();
  readonly ownPatient: string | undefined;

  constructor(
    private readonly opts: {
      principal: Principal;
      policy: RolePolicy;
      /** Break-glass granted for this request: the care-team narrowing is lifted. */
      breakGlass: boolean;
      /** Resolved care team (when the policy narrows to it and glass is not broken). */
      careTeam: readonly string[];
      baseUrl: string;
    },
  ) {
    this.ownPatient = ownPatientOf(opts.principal);
  }

  get policy(): RolePolicy {
    return this.opts.policy;
  }

  /** The sensitivity classes the role may see (undefined: no role restriction). */
  get visibleClasses(): readonly string[] | undefined {
    return this.opts.policy.visibleClasses;
  }

  private parts(type: string, i: Interaction) {
    const key = `${type}.${i}`;
    let c = this.cache.get(key);
    if (!c) {
      const scope = this.scopePredicate(type, i);
      const role = this.rolePredicate(type, i);
      c = { scope, role, all: and(scope, role) };
      this.cache.set(key, c);
    }
    return c;
  }

  /** The predicate of `interaction` on `type`. */
  predicate(type: string, i: Interaction): AccessPredicate {
    return this.parts(type, i).all;
  }

  /** Why `interaction` on `type` is out of reach whatever the resource, or undefined. */
  denial(type: string, i: Interaction): 'FORBIDDEN_SCOPE' | 'FORBIDDEN_POLICY' | undefined {
    const c = this.parts(type, i);
    if (c.scope.op === 'false') return 'FORBIDDEN_SCOPE';
    if (c.role.op === 'false' || c.all.op === 'false') return 'FORBIDDEN_POLICY';
    return undefined;
  }

  /** Whether one version may be touched by `interaction`. */
  allows(type: string, i: Interaction, facts: VersionFacts): boolean {
    return evaluate(this.predicate(type, i), facts);
  }

  /**
   * The token's scopes: any scope for the type and interaction; a `patient/` scope confines to the
   * launch patient (or a patient user's own Patient), a granular scope adds its criteria.
   */
  private scopePredicate(type: string, i: Interaction): AccessPredicate {
    const p = this.opts.principal;
    if (!p.scopes) return p.can(type, i) ? TRUE : FALSE;
    const launch = p.launchPatient ?? this.ownPatient;
    return or(
      ...p.scopes
        .filter((s: SmartScope) => (s.resourceType === '*' || s.resourceType === type) && s[i])
        .map((s) => {
          const ctx = s.context === 'patient' ? patientsPred(launch ? [launch] : []) : TRUE;
          if (s.query === undefined) return ctx;
          try {
            return and(ctx, criteriaPredicate(type, s.query, this.opts.baseUrl));
          } catch (e) {
            // Criteria we cannot compile grant nothing (never more than asked).
            if (isCustosError(e)) return FALSE;
            throw e;
          }
        }),
    );
  }

  private rolePredicate(type: string, i: Interaction): AccessPredicate {
    const applies = (r: AccessRule) =>
      r.interactions.includes(i) &&
      (r.types.includes(type) || (r.types.includes('*') && type !== 'AuditEvent'));
    const rule = (r: AccessRule): AccessPredicate => {
      const compartment =
        r.compartment === 'own'
          ? patientsPred(this.ownPatient ? [this.ownPatient] : [])
          : r.compartment === 'care-team'
            ? this.opts.breakGlass
              ? TRUE
              : patientsPred(this.opts.careTeam)
            : TRUE;
      return r.criteria === undefined
        ? compartment
        : and(compartment, criteriaPredicate(type, r.criteria, this.opts.baseUrl));
    };
    const rules = this.opts.policy.rules.filter(applies);
    return and(
      or(...rules.filter((r) => r.effect === 'allow').map(rule)),
      not(or(...rules.filter((r) => r.effect === 'deny').map(rule))),
    );
  }
}

// ---- storage: policy versions and break-glass alerts -----------------------------------------

export interface StoredPolicy {
  projectId: string;
  role: UserRole;
  /** 0 for a built-in default that no one has changed. */
  version: number;
  policy: RolePolicy;
  changedBy?: string;
  changedAt?: string;
}

/** The current policy of every role of a project (the latest version, or the built-in default). */
export async function loadPolicies(q: SqlQueryable, projectId: string): Promise<Map<UserRole, StoredPolicy>> {
  const r = await q.query<{
    role: UserRole;
    version: number;
    policy: RolePolicy;
    changed_by: string;
    changed_at: Date | string;
  }>(
    `SELECT DISTINCT ON (role) role, version, policy, changed_by, changed_at FROM access_policy
      WHERE project_id = $1 ORDER BY role, version DESC`,
    [projectId],
  );
  const out = new Map<UserRole, StoredPolicy>();
  for (const role of USER_ROLES)
    out.set(role, { projectId, role, version: 0, policy: DEFAULT_POLICIES[role] });
  for (const x of r.rows)
    out.set(x.role, {
      projectId,
      role: x.role,
      version: Number(x.version),
      policy: typeof x.policy === 'string' ? (JSON.parse(x.policy) as RolePolicy) : x.policy,
      changedBy: x.changed_by,
      changedAt: new Date(x.changed_at).toISOString(),
    });
  return out;
}

export interface PolicyAdminDeps {
  db: SqlDriver;
  audit: AuditLog;
  isResourceType: (t: string) => boolean;
  /**
   * The sensitivity class of a search parameter whose values are encrypted (minimum-necessary.ts
   * ProtectedParams), when field encryption is on: criteria on such a parameter are refused.
   */
  protectedClassOf?: (type: string, code: string) => string | undefined;
}

/**
 * Refuses criteria on a parameter whose values are encrypted: the store keeps only blind indexes
 * for it, so such a rule would silently match nothing (an allow granting nothing, a deny denying
 * nothing). Said at save time rather than found out later.
 */
function assertNoProtectedCriteria(policy: RolePolicy, deps: PolicyAdminDeps): void {
  if (!deps.protectedClassOf) return;
  policy.rules.forEach((r, i) => {
    if (r.criteria === undefined) return;
    for (const key of new URLSearchParams(r.criteria).keys()) {
      const code = key.split(':')[0]!;
      for (const type of r.types) {
        const cls = deps.protectedClassOf!(type, code);
        if (cls)
          policyInvalid(
            `rules[${i}]: criteria on '${code}' cannot be enforced: ${type}.${code} is encrypted ` +
              `(class ${cls}) and the store keeps no plain index of it.`,
          );
      }
    }
  });
}

async function assertProject(db: SqlQueryable, projectId: unknown): Promise<string> {
  if (typeof projectId !== 'string' || projectId === '') throw new CustosError('PROJECT_NOT_FOUND');
  const r = await db.query('SELECT 1 FROM project WHERE id = $1', [projectId]);
  if (r.rows.length === 0) throw new CustosError('PROJECT_NOT_FOUND');
  return projectId;
}

function assertRole(role: unknown): UserRole {
  if (!USER_ROLES.includes(role as UserRole)) policyInvalid(`role must be one of ${USER_ROLES.join(', ')}.`);
  return role as UserRole;
}

/** `custos policy list`, POST /admin/policies/list: the current policy of each role. */
export async function listPolicies(deps: PolicyAdminDeps, projectId: unknown): Promise<StoredPolicy[]> {
  const id = await assertProject(deps.db, projectId);
  return [...(await loadPolicies(deps.db, id)).values()];
}

/**
 * `custos policy show`, POST /admin/policies/show: one role's policy (the current one, or `version`;
 * version 0 is the built-in default) and the list of its stored versions, newest first.
 */
export async function showPolicy(
  deps: Pick<PolicyAdminDeps, 'db'>,
  projectId: unknown,
  role: unknown,
  version?: unknown,
): Promise<StoredPolicy & { current: number; history: Omit<StoredPolicy, 'policy'>[] }> {
  const id = await assertProject(deps.db, projectId);
  const r = assertRole(role);
  if (version !== undefined && (!Number.isInteger(version) || (version as number) < 0))
    policyInvalid('version must be a whole number (0: the built-in default).');
  const current = (await loadPolicies(deps.db, id)).get(r)!;
  const h = await deps.db.query<{ version: number; changed_by: string; changed_at: Date | string }>(
    'SELECT version, changed_by, changed_at FROM access_policy WHERE project_id = $1 AND role = $2 ORDER BY version DESC',
    [id, r],
  );
  const history = h.rows.map((x) => ({
    projectId: id,
    role: r,
    version: Number(x.version),
    changedBy: x.changed_by,
    changedAt: new Date(x.changed_at).toISOString(),
  }));
  let shown: StoredPolicy = current;
  if (version === 0) shown = { projectId: id, role: r, version: 0, policy: DEFAULT_POLICIES[r] };
  else if (version !== undefined && version !== current.version) {
    const v = await deps.db.query<{ policy: RolePolicy | string }>(
      'SELECT policy FROM access_policy WHERE project_id = $1 AND role = $2 AND version = $3',
      [id, r, version],
    );
    const row = v.rows[0];
    if (!row)
      throw new CustosError('NOT_FOUND', [
        {
          severity: 'error',
          code: 'not-found',
          expression: 'version',
          diagnostics: `The ${r} policy of this project has no version ${String(version)}.`,
        },
      ]);
    const meta = history.find((x) => x.version === version)!;
    shown = {
      ...meta,
      policy: typeof row.policy === 'string' ? (JSON.parse(row.policy) as RolePolicy) : row.policy,
    };
  }
  return { ...shown, current: current.version, history };
}

/**
 * `custos policy set`, POST /admin/policies/set: validates and stores a new version of a role's
 * policy (never overwriting an earlier one), audited as `policy.changed` in the same transaction
 * (no audit, no change). Takes effect within POLICY_CACHE_MS in running servers.
 */
export async function setPolicy(
  deps: PolicyAdminDeps,
  req: { projectId: unknown; role: unknown; policy: unknown; changedBy?: string },
  requestId = newId(),
): Promise<StoredPolicy> {
  const projectId = await assertProject(deps.db, req.projectId);
  const role = assertRole(req.role);
  const policy = validatePolicy(req.policy, deps.isResourceType);
  assertNoProtectedCriteria(policy, deps);
  const changedBy = (req.changedBy ?? 'installation-admin').slice(0, 200);
  // One writer per (project, role) at a time: versions are consecutive, never taken twice.
  const row = await deps.db.lockedTransaction(`access_policy:${projectId}:${role}`, async (tx) => {
    const r = await tx.query<{ version: number; changed_at: Date | string }>(
      `INSERT INTO access_policy (project_id, role, version, policy, changed_by)
       SELECT $1, $2, COALESCE(max(version), 0) + 1, $3::jsonb, $4 FROM access_policy WHERE project_id = $1 AND role = $2
       RETURNING version, changed_at`,
      [projectId, role, JSON.stringify(policy), changedBy],
    );
    const inserted = r.rows[0]!;
    // In the transaction: if the audit log cannot take it, the change is not made.
    await deps.audit.append(
      adminEvent('policy.changed', {
        requestId,
        projectId,
        resource: { type: 'AccessPolicy', id: `${role}/${inserted.version}` },
      }),
    );
    return inserted;
  });
  return {
    projectId,
    role,
    version: Number(row.version),
    policy,
    changedBy,
    changedAt: new Date(row.changed_at).toISOString(),
  };
}

export interface BreakGlassAlert {
  id: string;
  projectId: string;
  userId: string;
  clientId: string;
  role: string;
  purpose: string;
  /** The request that broke the glass: its audit events carry the sealed reason. */
  requestId: string;
  startedAt: string;
  expiresAt: string;
  reviewedAt?: string;
  reviewedBy?: string;
  /** The reviewer's finding. */
  outcome?: 'justified' | 'not-justified';
}

type BreakGlassRow = {
  id: string;
  project_id: string;
  user_id: string;
  client_id: string;
  role: string;
  purpose: string;
  request_id: string;
  started_at: Date | string;
  expires_at: Date | string;
  reviewed_at: Date | string | null;
  reviewed_by: string | null;
  outcome: 'justified' | 'not-justified' | null;
};

function toAlert(x: BreakGlassRow): BreakGlassAlert {
  return {
    id: x.id,
    projectId: x.project_id,
    userId: x.user_id,
    clientId: x.client_id,
    role: x.role,
    purpose: x.purpose,
    requestId: x.request_id,
    startedAt: new Date(x.started_at).toISOString(),
    expiresAt: new Date(x.expires_at).toISOString(),
    reviewedAt: x.reviewed_at ? new Date(x.reviewed_at).toISOString() : undefined,
    reviewedBy: x.reviewed_by ?? undefined,
    outcome: x.outcome ?? undefined,
  };
}

/**
 * The break-glass grant in force for a person, or a new one (its row is the alert an administrator
 * must review). A grant lasts `minutes`; after it, breaking the glass again opens a new grant and a
 * new alert.
 */
export async function openBreakGlass(
  q: SqlQueryable,
  g: {
    projectId: string;
    userId: string;
    clientId: string;
    role: string;
    purpose: string;
    requestId: string;
    now: Date;
    minutes: number;
  },
): Promise<BreakGlassAlert> {
  const live = await q.query<BreakGlassRow>(
    `SELECT * FROM break_glass WHERE project_id = $1 AND user_id = $2 AND expires_at > $3
      ORDER BY started_at DESC LIMIT 1`,
    [g.projectId, g.userId, g.now.toISOString()],
  );
  if (live.rows[0]) return toAlert(live.rows[0]);
  const r = await q.query<BreakGlassRow>(
    `INSERT INTO break_glass (id, project_id, user_id, client_id, role, purpose, request_id, started_at, expires_at)
     VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9) RETURNING *`,
    [
      newId(),
      g.projectId,
      g.userId,
      g.clientId,
      g.role,
      g.purpose,
      g.requestId,
      g.now.toISOString(),
      new Date(g.now.getTime() + g.minutes * 60_000).toISOString(),
    ],
  );
  return toAlert(r.rows[0]!);
}

/** `custos break-glass list`, POST /admin/break-glass/list: alerts, unreviewed first, newest first. */
export async function listBreakGlass(
  deps: { db: SqlQueryable },
  opts: { projectId?: string; pending?: boolean } = {},
): Promise<BreakGlassAlert[]> {
  const where: string[] = [];
  const params: unknown[] = [];
  if (opts.projectId) where.push(`project_id = $${params.push(opts.projectId)}`);
  if (opts.pending) where.push('reviewed_at IS NULL');
  const r = await deps.db.query<BreakGlassRow>(
    `SELECT * FROM break_glass ${where.length ? `WHERE ${where.join(' AND ')}` : ''}
      ORDER BY (reviewed_at IS NULL) DESC, started_at DESC LIMIT 1000`,
    params,
  );
  return r.rows.map(toAlert);
}

/**
 * `custos break-glass review`, POST /admin/break-glass/review: records the finding once, audited as
 * `break_glass.reviewed` in the same transaction (no audit, no finding).
 */
export async function reviewBreakGlass(
  deps: { db: SqlDriver; audit: AuditLog },
  req: { id: unknown; outcome: unknown; reviewedBy?: unknown },
  requestId = newId(),
): Promise<BreakGlassAlert> {
  const noSuchAlert = () =>
    new CustosError('NOT_FOUND', [
      {
        severity: 'error',
        code: 'not-found',
        expression: 'id',
        diagnostics: 'No break-glass alert with this id.',
      },
    ]);
  if (typeof req.id !== 'string' || !/^[A-Za-z0-9-]{1,64}$/.test(req.id)) throw noSuchAlert();
  if (req.outcome !== 'justified' && req.outcome !== 'not-justified')
    throw new CustosError('BAD_REQUEST', [
      {
        severity: 'error',
        code: 'value',
        expression: 'outcome',
        diagnostics: "outcome must be 'justified' or 'not-justified'.",
      },
    ]);
  const by =
    typeof req.reviewedBy === 'string' && req.reviewedBy !== ''
      ? req.reviewedBy.slice(0, 200)
      : 'installation-admin';
  const id = req.id;
  const outcome = req.outcome;
  return deps.db.transaction(async (tx) => {
    const r = await tx.query<BreakGlassRow>(
      `UPDATE break_glass SET reviewed_at = now(), reviewed_by = $2, outcome = $3
        WHERE id = $1 AND reviewed_at IS NULL RETURNING *`,
      [id, by, outcome],
    );
    if (!r.rows[0]) {
      const exists = await tx.query('SELECT 1 FROM break_glass WHERE id = $1', [id]);
      throw exists.rows.length ? new CustosError('BREAK_GLASS_REVIEWED') : noSuchAlert();
    }
    const alert = toAlert(r.rows[0]);
    await deps.audit.append(
      adminEvent('break_glass.reviewed', {
        requestId,
        projectId: alert.projectId,
        resource: { type: 'BreakGlass', id: alert.id },
        // The finding, without free text: 1 justified, 0 not justified.
        count: outcome === 'justified' ? 1 : 0,
      }),
    );
    return alert;
  });
}
