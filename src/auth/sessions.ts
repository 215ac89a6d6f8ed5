import { createHash, randomBytes } from 'node:crypto';
import type { SqlDriver, SqlQueryable } from '../store/sql-driver.ts';
import type { AuditLog } from '../audit/audit-log.ts';
import { newId } from '../kernel/ids.ts';
import type { UserRole } from './users.ts';

/** Why a session is no longer usable. */
export type SessionEndReason = 'logout' | 'idle' | 'expired' | 'deactivated' | 'password_reset' | 'mfa_reset';

/** A live session, as {@link SessionStore.validate} returns it. */
export interface Session {
  userId: string;
  projectId: string;
  role: UserRole;
  fhirUser: string | undefined;
  /** Authentication methods used at login (RFC 8176: `pwd`, `otp`, `mfa`), for a later id_token's `amr`. */
  amr: string[];
  /** When the user logged in (a later id_token's `auth_time`). */
  authTime: Date;
  /** The absolute end of the session, whatever the activity. */
  expiresAt: Date;
  /** When the session ends if it is not used again before. */
  idleExpiresAt: Date;
}

export type SessionCheck =
  { ok: true; session: Session } | { ok: false; reason: 'unknown' | SessionEndReason | 'inactive_user' };

interface SessionRow {
  user_id: string;
  project_id: string;
  role: UserRole;
  fhir_user: string | null;
  amr: string[];
  created_at: Date | string;
  last_seen_at: Date | string;
  expires_at: Date | string;
  ended_at: Date | string | null;
  end_reason: SessionEndReason | null;
  active: boolean;
}

/** base64url SHA-256 of a session id: what the table stores (the id itself is only with the browser). */
export function sessionIdHash(sessionId: string): string {
  return createHash('sha256').update(sessionId, 'utf8').digest('base64url');
}

/**
 * Login sessions of people (the login and consent pages; OAuth tokens are separate), in table
 * `user_session` of the resource database.
 *
 * A session id is 256 random bits, shown once to the caller (to put in a cookie); the table keeps
 * only its SHA-256, so a dump of the database yields no usable session. A session ends after
 * `idleMinutes` without use (HIPAA automatic logoff, 45 CFR 164.312(a)(2)(iii)) and in any case
 * `maxHours` after login; deactivating a user or resetting their password or MFA ends all their
 * sessions at once ({@link endAllForUser}). Times come from the injected clock, never from the
 * database's `now()`, so tests can move time.
 *
 * @example
 * const sessions = new SessionStore({ db, idleMinutes: 15, maxHours: 8 });
 * const { sessionId } = await sessions.create({ id: user.id, projectId: user.projectId }, ['pwd', 'otp']);
 * const check = await sessions.validate(sessionId); // { ok: true, session } and idle timer restarted
 */
export class SessionStore {
  private readonly db: SqlDriver;
  private readonly audit: AuditLog | undefined;
  readonly idleMs: number;
  readonly maxMs: number;
  private readonly now: () => number;

  constructor(opts: {
    db: SqlDriver;
    idleMinutes: number;
    maxHours: number;
    audit?: AuditLog;
    now?: () => number;
  }) {
    this.db = opts.db;
    this.audit = opts.audit;
    this.idleMs = opts.idleMinutes * 60_000;
    this.maxMs = opts.maxHours * 3_600_000;
    this.now = opts.now ?? Date.now;
  }

  /** Starts a session for a user who just logged in; returns its id (shown once) and its limits. */
  async create(
    user: { id: string; projectId: string },
    amr: string[],
  ): Promise<{ sessionId: string; expiresAt: Date; idleExpiresAt: Date }> {
    const sessionId = randomBytes(32).toString('base64url');
    const now = this.now();
    const expiresAt = new Date(now + this.maxMs);
    await this.db.query(
      `INSERT INTO user_session (id_hash, user_id, project_id, amr, created_at, last_seen_at, expires_at)
       VALUES ($1, $2, $3, $4, $5::timestamptz, $5::timestamptz, $6::timestamptz)`,
      [
        sessionIdHash(sessionId),
        user.id,
        user.projectId,
        amr,
        new Date(now).toISOString(),
        expiresAt.toISOString(),
      ],
    );
    return {
      sessionId,
      expiresAt,
      idleExpiresAt: new Date(Math.min(now + this.idleMs, expiresAt.getTime())),
    };
  }

  /**
   * Checks a session id and, when it is live, restarts its idle timer. A session past its idle or
   * absolute limit is ended (and that end audited) and reported with the reason; so is one whose
   * user was deactivated meanwhile.
   */
  async validate(sessionId: string): Promise<SessionCheck> {
    if (typeof sessionId !== 'string' || sessionId.length === 0 || sessionId.length > 128)
      return { ok: false, reason: 'unknown' };
    const idHash = sessionIdHash(sessionId);
    const now = this.now();
    const { rows } = await this.db.query<SessionRow>(
      `SELECT s.user_id, s.project_id, u.role, u.fhir_user, s.amr, s.created_at, s.last_seen_at,
              s.expires_at, s.ended_at, s.end_reason, u.active
         FROM user_session s JOIN app_user u ON u.id = s.user_id WHERE s.id_hash = $1`,
      [idHash],
    );
    const row = rows[0];
    if (!row) return { ok: false, reason: 'unknown' };
    if (row.ended_at !== null) return { ok: false, reason: row.end_reason ?? 'logout' };
    if (!row.active) {
      await this.end(idHash, 'deactivated', row);
      return { ok: false, reason: 'inactive_user' };
    }
    const expiresAt = new Date(row.expires_at).getTime();
    if (now >= expiresAt) {
      await this.end(idHash, 'expired', row);
      return { ok: false, reason: 'expired' };
    }
    if (now >= new Date(row.last_seen_at).getTime() + this.idleMs) {
      await this.end(idHash, 'idle', row);
      return { ok: false, reason: 'idle' };
    }
    // Compare-and-set on the live row: a concurrent end (deactivation) wins.
    const touched = await this.db.query(
      `UPDATE user_session SET last_seen_at = $2::timestamptz WHERE id_hash = $1 AND ended_at IS NULL RETURNING id_hash`,
      [idHash, new Date(Math.max(now, new Date(row.last_seen_at).getTime())).toISOString()],
    );
    if (touched.rows.length === 0) return { ok: false, reason: 'deactivated' };
    return {
      ok: true,
      session: {
        userId: row.user_id,
        projectId: row.project_id,
        role: row.role,
        fhirUser: row.fhir_user ?? undefined,
        amr: row.amr,
        authTime: new Date(row.created_at),
        expiresAt: new Date(expiresAt),
        idleExpiresAt: new Date(Math.min(now + this.idleMs, expiresAt)),
      },
    };
  }

  /** Logout: ends the session. Unknown or already-ended ids are ignored. */
  async logout(sessionId: string): Promise<void> {
    const idHash = sessionIdHash(sessionId);
    const { rows } = await this.db.query<SessionRow>(
      `SELECT s.user_id, s.project_id FROM user_session s WHERE s.id_hash = $1 AND s.ended_at IS NULL`,
      [idHash],
    );
    if (rows[0]) await this.end(idHash, 'logout', rows[0]);
  }

  /**
   * Ends every live session of a user at once (deactivation, password or MFA reset); `tx` runs it in
   * the caller's transaction. Returns how many were ended.
   */
  async endAllForUser(userId: string, reason: SessionEndReason, tx: SqlQueryable = this.db): Promise<number> {
    const { rows } = await tx.query(
      `UPDATE user_session SET ended_at = $2::timestamptz, end_reason = $3
        WHERE user_id = $1 AND ended_at IS NULL RETURNING id_hash`,
      [userId, new Date(this.now()).toISOString(), reason],
    );
    // And the user's OAuth grants: refresh tokens, unused codes, the authorization server's own
    // sessions (src/auth/authorization-server.ts). Access tokens, at most five minutes long, stop at
    // the resource server's next check of the user (authenticate.ts) for a deactivation.
    await tx.query(`DELETE FROM oidc_payload WHERE payload->>'accountId' = $1`, [userId]);
    return rows.length;
  }

  private async end(
    idHash: string,
    reason: SessionEndReason,
    row: Pick<SessionRow, 'user_id' | 'project_id'>,
  ) {
    const ended = await this.db.query(
      `UPDATE user_session SET ended_at = $2::timestamptz, end_reason = $3
        WHERE id_hash = $1 AND ended_at IS NULL RETURNING id_hash`,
      [idHash, new Date(this.now()).toISOString(), reason],
    );
    if (ended.rows.length === 0 || !this.audit) return;
    await this.audit.append({
      v: 1,
      id: newId(),
      time: new Date(this.now()).toISOString(),
      phase: 'access',
      action: 'authenticate',
      outcome: 'success',
      code: `session.${reason}`,
      requestId: newId(),
      projectId: row.project_id,
      actor: { userId: row.user_id },
      resource: { type: 'Session' },
      source: {},
    });
  }
}
