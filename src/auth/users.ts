import type { SqlDriver } from '../store/sql-driver.ts';
import { classifyDatabaseError } from '../store/sql-driver.ts';
import type { AuditLog } from '../audit/audit-log.ts';
import { adminEvent, type AuditEvent } from '../audit/audit-event.ts';
import { CustosError, type ErrorCode } from '../kernel/errors.ts';
import { isFhirId, newId } from '../kernel/ids.ts';
import { assertPasswordPolicy, dummyHash, hashPassword, needsRehash, verifyPassword } from './passwords.ts';
import { matchTotp, newTotpSecret, TotpSealer, totpUri } from './totp.ts';
import type { SessionStore } from './sessions.ts';

/** The roles of people (INTERFACE.md `custos user create --role`). */
export const USER_ROLES = ['practitioner', 'patient', 'admin', 'auditor'] as const;
export type UserRole = (typeof USER_ROLES)[number];

/** A user, as stored (never with a password hash or TOTP secret). */
export interface User {
  readonly id: string;
  readonly projectId: string;
  readonly role: UserRole;
  /** Lower-cased email: the login name, unique within the project. */
  readonly email: string;
  /** The FHIR resource the person is in this project (`Patient/123`, `Practitioner/abc`, `RelatedPerson/x`). */
  readonly fhirUser: string | undefined;
  readonly active: boolean;
  readonly mfaEnrolled: boolean;
}

export interface CreateUserInput {
  projectId: string;
  role: string;
  email: string;
  fhirUser?: string;
  /** Enrol TOTP now (required for administrators and in projects that require MFA). */
  mfa?: boolean;
  password: string;
}

/** What `custos user create` prints: the id and, with MFA, the TOTP secret (shown once). */
export interface CreatedUser {
  userId: string;
  totpSecret?: string;
  /** The same secret as an `otpauth://` URI (for a QR code). */
  totpUri?: string;
}

/** How a user is named in an administrative request: by id, or by project and email. */
export type UserRef = { userId: string } | { projectId: string; email: string };

/** Why a login was refused; the audit event's code is `login.<reason>`. */
export type LoginFailureReason =
  | 'unknown_user'
  | 'inactive'
  | 'locked'
  | 'bad_password'
  | 'mfa_required'
  | 'mfa_not_enrolled'
  | 'bad_totp'
  | 'totp_replayed'
  | 'project_required';

export type LoginResult =
  | { ok: true; user: User; amr: string[] }
  | {
      ok: false;
      reason: LoginFailureReason;
      /** The catalog code to answer with: the same for every reason that must not be told apart. */
      code: ErrorCode;
      /** With `locked`: seconds until the lock ends. */
      retryAfterSeconds?: number;
    };

/** Lockout with exponential backoff (docs/users.md). */
export interface LockoutPolicy {
  /** Consecutive failures that lock the account. */
  threshold: number;
  /** First lock duration; each further lock before a successful login doubles it. */
  baseSeconds: number;
  /** Longest lock. */
  maxSeconds: number;
}
export const DEFAULT_LOCKOUT: LockoutPolicy = Object.freeze({
  threshold: 5,
  baseSeconds: 60,
  maxSeconds: 3600,
});

/** What the audit of a login attempt records about the request (never the password or the code). */
export interface LoginContext {
  requestId?: string;
  ip?: string;
  userAgent?: string;
}

interface UserRow {
  id: string;
  project_id: string;
  role: UserRole;
  email: string;
  fhir_user: string | null;
  active: boolean;
  password_hash: string | null;
  mfa_secret: string | null;
  mfa_last_step: string | number | null;
  locked_until: Date | string | null;
  project_mfa_required: boolean;
}

const USER_COLUMNS = `u.id, u.project_id, u.role, u.email, u.fhir_user, u.active, u.password_hash, u.mfa_secret,
  u.mfa_last_step, u.locked_until, p.mfa_required AS project_mfa_required`;

/** The FHIR resource types a user may be bound to, and by which roles. */
const BINDABLE: Readonly<Record<UserRole, readonly string[]>> = {
  patient: ['Patient'],
  practitioner: ['Practitioner', 'RelatedPerson'],
  admin: ['Practitioner', 'RelatedPerson'],
  auditor: ['Practitioner', 'RelatedPerson'],
};
const EMAIL = /^[^\s@]+@[^\s@]+\.[^\s@]+$/;

const bad = (diagnostics: string, expression?: string) =>
  new CustosError('BAD_REQUEST', [{ severity: 'error', code: 'value', diagnostics, expression }]);

/** Lower-cased, trimmed email; `BAD_REQUEST` when it is not an address. */
export function normalizeEmail(email: unknown): string {
  if (typeof email !== 'string') throw bad('An email address is required.', 'email');
  const e = email.trim().toLowerCase();
  if (e.length > 254 || !EMAIL.test(e)) throw bad('The email is not an email address.', 'email');
  return e;
}

/**
 * Checks `fhirUser` (`Type/id`) against the role: a patient must be bound to a Patient; other roles
 * may be bound to a Practitioner or RelatedPerson, or to nothing. `INVALID_FHIR_USER` otherwise.
 */
export function checkFhirUser(role: UserRole, fhirUser: string | undefined): string | undefined {
  const invalid = (diagnostics: string) =>
    new CustosError('INVALID_FHIR_USER', [
      { severity: 'error', code: 'value', expression: 'fhirUser', diagnostics },
    ]);
  if (fhirUser === undefined || fhirUser === '') {
    if (role === 'patient') throw invalid('A patient user must be bound to a Patient: give Patient/<id>.');
    return undefined;
  }
  const m = /^([A-Za-z]+)\/([^/]+)$/.exec(fhirUser);
  if (!m || !isFhirId(m[2]!))
    throw invalid('fhirUser must be Patient/<id>, Practitioner/<id> or RelatedPerson/<id> with a FHIR id.');
  if (!['Patient', 'Practitioner', 'RelatedPerson'].includes(m[1]!))
    throw invalid('fhirUser must name a Patient, Practitioner or RelatedPerson.');
  if (!BINDABLE[role].includes(m[1]!))
    throw invalid(
      role === 'patient'
        ? 'A patient user must be bound to a Patient.'
        : 'Only patient users may be bound to a Patient; bind staff to a Practitioner or RelatedPerson.',
    );
  return fhirUser;
}

function toUser(r: UserRow): User {
  return {
    id: r.id,
    projectId: r.project_id,
    role: r.role,
    email: r.email,
    fhirUser: r.fhir_user ?? undefined,
    active: r.active,
    mfaEnrolled: r.mfa_secret !== null,
  };
}

/**
 * People who log in: practitioners, patients, administrators and auditors of a project, in table
 * `app_user` (docs/users.md).
 *
 * Passwords are stored only as Argon2id hashes (passwords.ts). TOTP secrets are stored sealed under
 * a key in the data directory (totp.ts). Every administrative change is an audited admin action
 * (`user.created`, `user.password_reset`, `user.mfa_reset`, `user.deactivated`,
 * `project.mfa_policy_changed`), and every login attempt an `authenticate` event, refused ones with
 * the precise reason (`login.bad_password`, `login.locked`, …). Times come from the injected clock.
 *
 * @example
 * const totp = TotpSealer.fromKeyFile('.custos/keys/totp-secret.key');
 * const users = new UserService({ db, audit, sessions, totp });
 * const { userId, totpSecret } = await users.create({
 *   projectId, role: 'practitioner', email: 'dr.zzyzx@example.org', fhirUser: 'Practitioner/p1',
 *   mfa: true, password: 'a long passphrase of words',
 * });
 * const r = await users.verifyLogin({ projectId, email: 'dr.zzyzx@example.org', password, totp: '123456' });
 */
export class UserService {
  private readonly db: SqlDriver;
  private readonly audit: AuditLog;
  private readonly sessions: SessionStore;
  private readonly sealer: TotpSealer;
  private readonly now: () => number;
  readonly lockout: LockoutPolicy;

  constructor(opts: {
    db: SqlDriver;
    audit: AuditLog;
    sessions: SessionStore;
    /** Seals TOTP secrets: `TotpSealer.fromKeyFile('<data dir>/keys/totp-secret.key')`. */
    totp: TotpSealer;
    now?: () => number;
    lockout?: LockoutPolicy;
  }) {
    this.db = opts.db;
    this.audit = opts.audit;
    this.sessions = opts.sessions;
    this.sealer = opts.totp;
    this.now = opts.now ?? Date.now;
    this.lockout = opts.lockout ?? DEFAULT_LOCKOUT;
  }

  /**
   * Creates a user. Refuses, with a code naming the problem: an unknown role or a malformed email
   * (`BAD_REQUEST`), a bad binding (`INVALID_FHIR_USER`), a weak password (`PASSWORD_POLICY`), an
   * unknown project (`NOT_FOUND`), no `mfa` where MFA is required (`MFA_ENROLLMENT_REQUIRED`), an
   * email already used in the project (`USER_EXISTS`). Audited as `user.created`.
   */
  async create(input: CreateUserInput, requestId = newId()): Promise<CreatedUser> {
    if (typeof input.role !== 'string' || !(USER_ROLES as readonly string[]).includes(input.role))
      throw bad(`role must be one of ${USER_ROLES.join(', ')}.`, 'role');
    const role = input.role as UserRole;
    const email = normalizeEmail(input.email);
    const fhirUser = checkFhirUser(role, input.fhirUser);
    assertPasswordPolicy(input.password, email);
    const project = await this.project(input.projectId);
    if (!input.mfa && (role === 'admin' || project.mfaRequired))
      throw new CustosError('MFA_ENROLLMENT_REQUIRED', [
        {
          severity: 'error',
          code: 'business-rule',
          diagnostics:
            role === 'admin'
              ? 'Administrators must use MFA: create the user with --mfa.'
              : 'This project requires MFA: create the user with --mfa.',
        },
      ]);
    const id = newId();
    const passwordHash = await hashPassword(input.password);
    const secret = input.mfa ? newTotpSecret() : undefined;
    try {
      await this.db.query(
        `INSERT INTO app_user (id, project_id, role, email, fhir_user, password_hash, password_changed_at, mfa_secret)
         VALUES ($1, $2, $3, $4, $5, $6, $7::timestamptz, $8)`,
        [
          id,
          input.projectId,
          role,
          email,
          fhirUser ?? null,
          passwordHash,
          new Date(this.now()).toISOString(),
          secret ? this.sealer.seal(id, secret) : null,
        ],
      );
    } catch (e) {
      if (classifyDatabaseError(e) === 'unique_violation') throw new CustosError('USER_EXISTS');
      throw e;
    }
    await this.auditAdmin('user.created', requestId, input.projectId, id);
    return secret ? { userId: id, totpSecret: secret, totpUri: totpUri(secret, email) } : { userId: id };
  }

  /** The user, or undefined. */
  async find(ref: UserRef): Promise<User | undefined> {
    const row = await this.row(ref);
    return row && toUser(row);
  }

  /**
   * Administrator's password reset: a new password (policy-checked), the lockout cleared, every
   * session of the user ended. Audited as `user.password_reset`.
   */
  async resetPassword(
    ref: UserRef,
    password: string,
    requestId = newId(),
  ): Promise<{ userId: string; sessionsEnded: number }> {
    const user = await this.required(ref);
    assertPasswordPolicy(password, user.email);
    const passwordHash = await hashPassword(password);
    const sessionsEnded = await this.db.transaction(async (tx) => {
      await tx.query(
        `UPDATE app_user SET password_hash = $2, password_changed_at = $3::timestamptz,
                failed_logins = 0, lockouts = 0, locked_until = NULL WHERE id = $1`,
        [user.id, passwordHash, new Date(this.now()).toISOString()],
      );
      return this.sessions.endAllForUser(user.id, 'password_reset', tx);
    });
    await this.auditAdmin('user.password_reset', requestId, user.project_id, user.id, sessionsEnded);
    return { userId: user.id, sessionsEnded };
  }

  /**
   * Administrator's MFA reset (a lost phone): a new TOTP secret, shown once, replaces the old one;
   * every session of the user ends. Audited as `user.mfa_reset`.
   */
  async resetMfa(ref: UserRef, requestId = newId()): Promise<CreatedUser & { sessionsEnded: number }> {
    const user = await this.required(ref);
    const secret = newTotpSecret();
    const sessionsEnded = await this.db.transaction(async (tx) => {
      await tx.query(`UPDATE app_user SET mfa_secret = $2, mfa_last_step = NULL WHERE id = $1`, [
        user.id,
        this.sealer.seal(user.id, secret),
      ]);
      return this.sessions.endAllForUser(user.id, 'mfa_reset', tx);
    });
    await this.auditAdmin('user.mfa_reset', requestId, user.project_id, user.id, sessionsEnded);
    return { userId: user.id, totpSecret: secret, totpUri: totpUri(secret, user.email), sessionsEnded };
  }

  /**
   * Deactivates a user: logins are refused from now on and every session ends in the same
   * transaction. Audited as `user.deactivated` (with the number of sessions ended). Idempotent.
   */
  async deactivate(ref: UserRef, requestId = newId()): Promise<{ userId: string; sessionsEnded: number }> {
    const user = await this.required(ref);
    const sessionsEnded = await this.db.transaction(async (tx) => {
      await tx.query(`UPDATE app_user SET active = false, deactivated_at = $2::timestamptz WHERE id = $1`, [
        user.id,
        new Date(this.now()).toISOString(),
      ]);
      return this.sessions.endAllForUser(user.id, 'deactivated', tx);
    });
    await this.auditAdmin('user.deactivated', requestId, user.project_id, user.id, sessionsEnded);
    return { userId: user.id, sessionsEnded };
  }

  /**
   * Whether a project requires MFA of every user (administrators always need it). Users without
   * TOTP cannot log in there until an administrator resets their MFA. Audited as
   * `project.mfa_policy_changed`.
   */
  async setProjectMfaRequired(
    projectId: string,
    required: boolean,
    requestId = newId(),
  ): Promise<{ projectId: string; mfaRequired: boolean; usersWithoutMfa: number }> {
    const { rows } = await this.db.query('UPDATE project SET mfa_required = $2 WHERE id = $1 RETURNING id', [
      projectId,
      required,
    ]);
    if (rows.length === 0) throw noSuchProject();
    const without = await this.db.query<{ n: number }>(
      `SELECT count(*)::int AS n FROM app_user WHERE project_id = $1 AND active AND mfa_secret IS NULL`,
      [projectId],
    );
    await this.audit.append(
      adminEvent('project.mfa_policy_changed', {
        requestId,
        projectId,
        resource: { type: 'Project', id: projectId },
        count: required ? 1 : 0,
      }),
    );
    return { projectId, mfaRequired: required, usersWithoutMfa: without.rows[0]?.n ?? 0 };
  }

  /**
   * Checks a login: email and password, then (where required) a TOTP code. Returns the user, or the
   * precise reason for a refusal and the catalog code to answer with, which does not tell an unknown
   * email, an inactive account, a wrong password or a wrong code apart (all `LOGIN_FAILED`).
   *
   * - Order: a locked account is refused before its password is checked (no guessing during a lock).
   * - Lockout: each wrong password or code counts; `threshold` in a row lock the account for
   *   `baseSeconds`, doubling with each further lock before a successful login, up to `maxSeconds`.
   *   Counted per user, in the database, so every process sees it.
   * - MFA is required for administrators, in projects that require it, and for anyone enrolled.
   *   Without a code the answer is `MFA_REQUIRED` (the page then asks for it); this is given only
   *   after a right password.
   * - TOTP codes are valid ±1 step and never twice (replay: `totp_replayed`).
   * - Every attempt is audited (`authenticate`, code `login.<reason>` or `login.succeeded`), with the
   *   user's id when known; never the password, the code or the email typed. If the audit cannot be
   *   written the login throws (`AUDIT_UNAVAILABLE`): no audit, no login.
   * - Unknown emails cost one Argon2 verification too (no enumeration by timing).
   * `projectId` may be left out when the email belongs to one project only.
   */
  async verifyLogin(
    input: { projectId?: string; email: string; password: string; totp?: string },
    ctx: LoginContext = {},
  ): Promise<LoginResult> {
    const requestId = ctx.requestId ?? newId();
    const fail = async (
      reason: LoginFailureReason,
      row?: UserRow,
      extra: { retryAfterSeconds?: number } = {},
    ): Promise<LoginResult> => {
      await this.auditLogin(`login.${reason}`, 'refused', requestId, ctx, row);
      return { ok: false, reason, code: LOGIN_CODES[reason], ...extra };
    };
    let email: string;
    try {
      email = normalizeEmail(input.email);
    } catch {
      await verifyPassword(await dummyHash(), String(input.password ?? ''));
      return fail('unknown_user');
    }
    const password = typeof input.password === 'string' ? input.password : '';
    const candidates = await this.db.query<UserRow>(
      `SELECT ${USER_COLUMNS} FROM app_user u JOIN project p ON p.id = u.project_id
        WHERE lower(u.email) = $1 ${input.projectId !== undefined ? 'AND u.project_id = $2' : ''}`,
      input.projectId !== undefined ? [email, input.projectId] : [email],
    );
    if (candidates.rows.length > 1) return fail('project_required');
    const row = candidates.rows[0];
    if (!row || !row.active || row.password_hash === null) {
      await verifyPassword(await dummyHash(), password);
      return fail(!row ? 'unknown_user' : 'inactive', row);
    }
    const now = this.now();
    const lockedUntil = row.locked_until === null ? 0 : new Date(row.locked_until).getTime();
    if (lockedUntil > now)
      return fail('locked', row, { retryAfterSeconds: Math.ceil((lockedUntil - now) / 1000) });

    // A wrong password or code counts towards the lockout; the failure that locks the account says so.
    const failCounted = async (reason: LoginFailureReason, user: UserRow): Promise<LoginResult> => {
      const locked = await this.countFailure(user.id, now);
      const r = await fail(reason, user);
      return locked && !r.ok ? { ...r, code: 'ACCOUNT_LOCKED', retryAfterSeconds: locked } : r;
    };
    if (!(await verifyPassword(row.password_hash, password))) return failCounted('bad_password', row);
    const amr = ['pwd'];
    const mfaRequired = row.role === 'admin' || row.project_mfa_required || row.mfa_secret !== null;
    if (mfaRequired) {
      if (row.mfa_secret === null) return fail('mfa_not_enrolled', row);
      if (input.totp === undefined || input.totp === '') return fail('mfa_required', row);
      const step = matchTotp(this.sealer.open(row.id, row.mfa_secret), String(input.totp), now);
      if (step === undefined) return failCounted('bad_totp', row);
      // Compare-and-set: of two logins with the same code, exactly one wins (RFC 6238 section 5.2).
      const used = await this.db.query(
        `UPDATE app_user SET mfa_last_step = $2 WHERE id = $1 AND (mfa_last_step IS NULL OR mfa_last_step < $2)
         RETURNING id`,
        [row.id, step],
      );
      if (used.rows.length === 0) return failCounted('totp_replayed', row);
      amr.push('otp', 'mfa');
    }
    await this.db.query(
      `UPDATE app_user SET failed_logins = 0, lockouts = 0, locked_until = NULL, last_login_at = $2::timestamptz
              ${needsRehash(row.password_hash) ? ', password_hash = $3' : ''}
        WHERE id = $1`,
      needsRehash(row.password_hash)
        ? [row.id, new Date(now).toISOString(), await hashPassword(password)]
        : [row.id, new Date(now).toISOString()],
    );
    await this.auditLogin('login.succeeded', 'success', requestId, ctx, row);
    return { ok: true, user: toUser(row), amr };
  }

  /**
   * Counts one failed attempt, atomically; the `threshold`-th in a row locks the account. Returns
   * the lock's length in seconds when this failure locked it.
   */
  private async countFailure(userId: string, now: number): Promise<number | undefined> {
    const { threshold, baseSeconds, maxSeconds } = this.lockout;
    const { rows } = await this.db.query<{ failed_logins: number; locked_until: Date | string | null }>(
      `UPDATE app_user SET
         failed_logins = CASE WHEN failed_logins + 1 >= $2 THEN 0 ELSE failed_logins + 1 END,
         lockouts = CASE WHEN failed_logins + 1 >= $2 THEN lockouts + 1 ELSE lockouts END,
         locked_until = CASE WHEN failed_logins + 1 >= $2
           THEN $3::timestamptz + make_interval(secs => LEAST($4::float8 * power(2, LEAST(lockouts, 30)), $5::float8))
           ELSE locked_until END
       WHERE id = $1 RETURNING failed_logins, locked_until`,
      [userId, threshold, new Date(now).toISOString(), baseSeconds, maxSeconds],
    );
    const r = rows[0];
    if (!r || r.failed_logins !== 0 || r.locked_until === null || new Date(r.locked_until).getTime() <= now)
      return undefined;
    return Math.ceil((new Date(r.locked_until).getTime() - now) / 1000);
  }

  private async project(projectId: unknown): Promise<{ mfaRequired: boolean }> {
    if (typeof projectId !== 'string' || projectId === '') throw noSuchProject();
    const { rows } = await this.db.query<{ mfa_required: boolean }>(
      'SELECT mfa_required FROM project WHERE id = $1',
      [projectId],
    );
    if (!rows[0]) throw noSuchProject();
    return { mfaRequired: rows[0].mfa_required };
  }

  private async row(ref: UserRef): Promise<UserRow | undefined> {
    const byId = 'userId' in ref;
    if (byId && (typeof ref.userId !== 'string' || ref.userId === '')) return undefined;
    const { rows } = await this.db.query<UserRow>(
      `SELECT ${USER_COLUMNS} FROM app_user u JOIN project p ON p.id = u.project_id
        WHERE ${byId ? 'u.id = $1' : 'u.project_id = $1 AND lower(u.email) = $2'}`,
      byId ? [ref.userId] : [ref.projectId, normalizeEmail(ref.email)],
    );
    return rows[0];
  }

  private async required(ref: UserRef): Promise<UserRow> {
    const row = await this.row(ref);
    if (!row)
      throw new CustosError('NOT_FOUND', [
        { severity: 'error', code: 'not-found', diagnostics: 'No such user.' },
      ]);
    return row;
  }

  /**
   * Audits a login refused before any account was looked at (rate limit, bad form): an
   * `authenticate` event with no user, so failed attempts are in the log too.
   */
  async auditRefusedLogin(code: string, ctx: LoginContext, projectId?: string): Promise<void> {
    const event: AuditEvent = {
      v: 1,
      id: newId(),
      time: new Date(this.now()).toISOString(),
      phase: 'access',
      action: 'authenticate',
      outcome: 'refused',
      code,
      requestId: ctx.requestId ?? newId(),
      projectId,
      actor: {},
      source: { ip: ctx.ip },
    };
    await this.audit.append(event, ctx.userAgent ? { userAgent: ctx.userAgent } : undefined);
  }

  private async auditAdmin(
    code: string,
    requestId: string,
    projectId: string,
    userId: string,
    count?: number,
  ) {
    await this.audit.append(
      adminEvent(code, { requestId, projectId, resource: { type: 'User', id: userId }, count }),
    );
  }

  private async auditLogin(
    code: string,
    outcome: 'success' | 'refused',
    requestId: string,
    ctx: LoginContext,
    row: UserRow | undefined,
  ): Promise<void> {
    const event: AuditEvent = {
      v: 1,
      id: newId(),
      time: new Date(this.now()).toISOString(),
      phase: 'access',
      action: 'authenticate',
      outcome,
      code,
      requestId,
      projectId: row?.project_id,
      actor: row ? { userId: row.id, roles: [row.role] } : {},
      resource: row ? { type: 'User', id: row.id } : undefined,
      source: { ip: ctx.ip },
    };
    await this.audit.append(event, ctx.userAgent ? { userAgent: ctx.userAgent } : undefined);
  }
}

/** The catalog code each refusal answers with: reasons an attacker must not tell apart share one. */
const LOGIN_CODES: Readonly<Record<LoginFailureReason, ErrorCode>> = {
  unknown_user: 'LOGIN_FAILED',
  inactive: 'LOGIN_FAILED',
  bad_password: 'LOGIN_FAILED',
  bad_totp: 'LOGIN_FAILED',
  totp_replayed: 'LOGIN_FAILED',
  locked: 'ACCOUNT_LOCKED',
  mfa_required: 'MFA_REQUIRED',
  mfa_not_enrolled: 'MFA_ENROLLMENT_REQUIRED',
  project_required: 'BAD_REQUEST',
};

function noSuchProject(): CustosError {
  return new CustosError('NOT_FOUND', [
    { severity: 'error', code: 'not-found', diagnostics: 'No such project.' },
  ]);
}
