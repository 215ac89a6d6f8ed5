import { after, before, describe, test } from 'node:test';
import assert from 'node:assert/strict';
import { spawn } from 'node:child_process';
import fs from 'node:fs';
import path from 'node:path';
import { fileURLToPath } from 'node:url';
import { loadConfig } from '../src/config/config.ts';
import { silentLogger } from '../src/log/logger.ts';
import { dataPaths, openCore, type CustosCore } from '../src/server.ts';
import { UserService, type LoginResult } from '../src/auth/users.ts';
import { SessionStore } from '../src/auth/sessions.ts';
import { TotpSealer, totpCode } from '../src/auth/totp.ts';
import { ADMIN_TOKEN_HEADER } from '../src/admin/admin-routes.ts';
import { createTestStorage, type TestStorage } from './support/storage.ts';
import { startHarness, type Harness } from './support/harness.ts';

// Identities (issue 6, first slice): users of every role, Argon2id passwords, TOTP MFA, lockout with
// backoff, sessions with idle and absolute limits, administrators' resets, all audited. Time is an
// injected clock, never a sleep. All names and emails are synthetic.

const root = path.resolve(path.dirname(fileURLToPath(import.meta.url)), '..');
const bin = path.join(root, 'bin', 'custos.mjs');
const PASSWORD = 'violet-Zzyzx-harbour-1970';
const OTHER_PASSWORD = 'amber-Qwxz-lantern-2031';

interface Run {
  code: number;
  stdout: string;
  stderr: string;
}
/** `custos <args>` as a user runs it, with `stdin` piped in (the password). */
function custos(args: string[], env: Record<string, string>, stdin = ''): Promise<Run> {
  return new Promise((resolve, reject) => {
    const child = spawn(process.execPath, [bin, ...args], { env: { ...process.env, ...env }, cwd: root });
    let stdout = '';
    let stderr = '';
    child.stdout.on('data', (d) => (stdout += d));
    child.stderr.on('data', (d) => (stderr += d));
    child.on('error', reject);
    child.on('close', (code) => resolve({ code: code ?? -1, stdout, stderr }));
    child.stdin.end(stdin);
  });
}

/** Every audit entry, decoded. */
async function auditEntries(core: CustosCore): Promise<any[]> {
  return (await core.audit.read(0, 1_000_000)).map((r) => JSON.parse(r.entry.toString('utf8')));
}

/** Every row of every table of the resource database, and every audit entry, as one string. */
async function dumpEverything(core: CustosCore): Promise<string> {
  const tables = await core.resourceDb.query<{ tablename: string }>(
    `SELECT tablename FROM pg_tables WHERE schemaname = 'public'`,
  );
  let out = '';
  for (const { tablename } of tables.rows) {
    const rows = await core.resourceDb.query(`SELECT row_to_json(t)::text AS j FROM "${tablename}" t`);
    out += rows.rows.map((r) => (r as { j: string }).j).join('\n');
  }
  for (const r of await core.audit.read(0, 1_000_000)) out += r.entry.toString('utf8');
  return out;
}

describe('users, passwords, MFA, lockout and sessions (service, injected clock)', () => {
  let storage: TestStorage;
  let core: CustosCore;
  let projectId: string;
  let clock = Date.parse('2031-03-04T09:00:10Z');
  const now = () => clock;
  let users: UserService;
  let sessions: SessionStore;
  const secrets: string[] = [];
  const sessionIds: string[] = [];

  before(async () => {
    storage = await createTestStorage();
    const config = loadConfig(storage.env);
    core = await openCore(config, silentLogger);
    projectId = (await core.admin.init()).projectId;
    sessions = new SessionStore({
      db: core.resourceDb,
      audit: core.audit,
      idleMinutes: 15,
      maxHours: 8,
      now,
    });
    users = new UserService({
      db: core.resourceDb,
      audit: core.audit,
      sessions,
      totp: TotpSealer.fromKeyFile(dataPaths(config.dataDir).totpKey),
      now,
    });
  });
  after(async () => {
    await core?.close();
    await storage?.cleanup();
  });

  const login = (email: string, password: string, totp?: string): Promise<LoginResult> =>
    users.verifyLogin({ projectId, email, password, totp }, { ip: '127.0.0.1', userAgent: 'users.test' });

  test('a password is stored only as an Argon2id hash (OWASP parameters); login with it works', async () => {
    const { userId, totpSecret } = await users.create({
      projectId,
      role: 'practitioner',
      email: 'Dr.Zzyzx@Example.org',
      fhirUser: 'Practitioner/prac-zzyzx',
      password: PASSWORD,
    });
    assert.equal(totpSecret, undefined, 'no MFA asked for, none enrolled');
    const row = (
      await core.resourceDb.query<{ password_hash: string; email: string; fhir_user: string }>(
        'SELECT password_hash, email, fhir_user FROM app_user WHERE id = $1',
        [userId],
      )
    ).rows[0]!;
    assert.match(row.password_hash, /^\$argon2id\$v=19\$m=19456,t=2,p=1\$/);
    assert.ok(!row.password_hash.includes(PASSWORD));
    assert.equal(row.email, 'dr.zzyzx@example.org', 'emails are compared lower-cased');
    assert.equal(row.fhir_user, 'Practitioner/prac-zzyzx');

    const ok = await login('dr.zzyzx@example.org', PASSWORD);
    assert.ok(ok.ok);
    assert.equal(ok.user.id, userId);
    assert.equal(ok.user.role, 'practitioner');
    assert.deepEqual(ok.amr, ['pwd']);
    const audit = await auditEntries(core);
    const success = audit.filter((e) => e.action === 'authenticate' && e.code === 'login.succeeded');
    assert.equal(success.length, 1);
    assert.equal(success[0].actor.userId, userId);
    assert.equal(success[0].outcome, 'success');
    assert.ok(
      audit.some((e) => e.action === 'admin' && e.code === 'user.created' && e.resource.id === userId),
    );
  });

  test('a wrong password is refused and audited as a failed attempt, without the password', async () => {
    const r = await login('dr.zzyzx@example.org', 'not-the-password-at-all');
    assert.equal(r.ok, false);
    assert.ok(!r.ok && r.reason === 'bad_password' && r.code === 'LOGIN_FAILED');
    const unknown = await login('nobody.zzyzx@example.org', 'not-the-password-at-all');
    assert.ok(!unknown.ok && unknown.reason === 'unknown_user');
    assert.equal(unknown.code, 'LOGIN_FAILED', 'an unknown email looks like a wrong password');
    const audit = await auditEntries(core);
    const refused = audit.filter((e) => e.action === 'authenticate' && e.outcome === 'refused');
    assert.deepEqual(
      refused.map((e) => e.code),
      ['login.bad_password', 'login.unknown_user'],
    );
    assert.ok(refused[0].actor.userId, 'the attempt names the user it was against');
    assert.equal(refused[0].source.ip, '127.0.0.1');
    const text = JSON.stringify(audit);
    assert.ok(!text.includes('not-the-password-at-all'), 'no password in the audit log');
    assert.ok(!text.includes('nobody.zzyzx'), 'no typed email in the audit log');
  });

  test('lockout: 5 failures lock for 1 minute, the next lock doubles, success resets; counted in the database', async () => {
    await users.create({
      projectId,
      role: 'auditor',
      email: 'auditor.zzyzx@example.org',
      password: PASSWORD,
    });
    const email = 'auditor.zzyzx@example.org';
    for (let i = 1; i <= 4; i++) {
      const r = await login(email, `wrong-password-number-${i}`);
      assert.ok(!r.ok && r.code === 'LOGIN_FAILED', `failure ${i}`);
    }
    const fifth = await login(email, 'wrong-password-number-5');
    assert.ok(!fifth.ok && fifth.code === 'ACCOUNT_LOCKED' && fifth.retryAfterSeconds === 60);
    // Locked: even the right password is refused, and not checked.
    const during = await login(email, PASSWORD);
    assert.ok(!during.ok && during.reason === 'locked' && during.code === 'ACCOUNT_LOCKED');
    clock += 59_000;
    assert.ok(!(await login(email, PASSWORD)).ok, 'still locked after 59 s');
    clock += 2_000;
    // The lock is over; five more failures lock for twice as long (no success in between).
    for (let i = 1; i <= 4; i++) await login(email, `wrong-again-${i}-password`);
    const second = await login(email, 'wrong-again-5-password');
    assert.ok(!second.ok && second.retryAfterSeconds === 120);
    clock += 121_000;
    const ok = await login(email, PASSWORD);
    assert.ok(ok.ok, 'the right password after the lock works');
    const row = (
      await core.resourceDb.query<{ failed_logins: number; lockouts: number; locked_until: unknown }>(
        'SELECT failed_logins, lockouts, locked_until FROM app_user WHERE email = $1',
        [email],
      )
    ).rows[0]!;
    assert.deepEqual(
      row,
      { failed_logins: 0, lockouts: 0, locked_until: null },
      'success resets the backoff',
    );
    const codes = (await auditEntries(core)).filter((e) => e.actor?.userId === ok.user.id).map((e) => e.code);
    assert.equal(codes.filter((c) => c === 'login.locked').length, 2, 'attempts during a lock are audited');
  });

  test('the lock doubles up to its cap', async () => {
    const capped = new UserService({
      db: core.resourceDb,
      audit: core.audit,
      sessions,
      totp: TotpSealer.fromKeyFile(dataPaths(loadConfig(storage.env).dataDir).totpKey),
      now,
      lockout: { threshold: 2, baseSeconds: 60, maxSeconds: 200 },
    });
    await capped.create({
      projectId,
      role: 'practitioner',
      email: 'capped.zzyzx@example.org',
      password: PASSWORD,
    });
    const locks: number[] = [];
    for (let round = 0; round < 4; round++) {
      await capped.verifyLogin({
        projectId,
        email: 'capped.zzyzx@example.org',
        password: 'wrong-one-password',
      });
      const r = await capped.verifyLogin({
        projectId,
        email: 'capped.zzyzx@example.org',
        password: 'wrong-two-password',
      });
      assert.ok(!r.ok);
      locks.push(r.retryAfterSeconds!);
      clock += r.retryAfterSeconds! * 1000 + 1000;
    }
    assert.deepEqual(locks, [60, 120, 200, 200]);
  });

  test('administrators need TOTP: missing, wrong and replayed codes are refused; ±1 step accepted', async () => {
    await assert.rejects(
      users.create({ projectId, role: 'admin', email: 'admin2.zzyzx@example.org', password: PASSWORD }),
      (e: any) => e.code === 'MFA_ENROLLMENT_REQUIRED' && /--mfa/.test(e.details[0].diagnostics),
    );
    const created = await users.create({
      projectId,
      role: 'admin',
      email: 'admin2.zzyzx@example.org',
      password: PASSWORD,
      mfa: true,
    });
    const secret = created.totpSecret!;
    secrets.push(secret);
    assert.match(secret, /^[A-Z2-7]{32}$/, '160-bit base32 secret');
    assert.match(created.totpUri!, /^otpauth:\/\/totp\/Custos:admin2\.zzyzx%40example\.org\?/);
    const email = 'admin2.zzyzx@example.org';

    const none = await login(email, PASSWORD);
    assert.ok(!none.ok && none.reason === 'mfa_required' && none.code === 'MFA_REQUIRED');
    const wrongCode = totpCode(secret, clock) === '000000' ? '111111' : '000000';
    const wrong = await login(email, PASSWORD, wrongCode);
    assert.ok(!wrong.ok && wrong.reason === 'bad_totp' && wrong.code === 'LOGIN_FAILED');
    const noPassword = await login(email, 'wrong-password-here', totpCode(secret, clock));
    assert.ok(
      !noPassword.ok && noPassword.reason === 'bad_password',
      'a right code does not replace the password',
    );

    const code = totpCode(secret, clock);
    const ok = await login(email, PASSWORD, code);
    assert.ok(ok.ok);
    assert.deepEqual(ok.amr, ['pwd', 'otp', 'mfa']);
    const replay = await login(email, PASSWORD, code);
    assert.ok(!replay.ok && replay.reason === 'totp_replayed' && replay.code === 'LOGIN_FAILED');
    // The previous step's code is older than the one used: refused too.
    const older = await login(email, PASSWORD, totpCode(secret, clock - 30_000));
    assert.ok(!older.ok && older.reason === 'totp_replayed');

    // Clock drift: one step late is accepted, two are not.
    clock += 60_000;
    assert.ok(!(await login(email, PASSWORD, totpCode(secret, clock - 60_000))).ok, 'two steps old');
    assert.ok((await login(email, PASSWORD, totpCode(secret, clock - 30_000))).ok, 'one step old');
    clock += 60_000;
    assert.ok((await login(email, PASSWORD, totpCode(secret, clock + 30_000))).ok, 'one step ahead');

    const codes = (await auditEntries(core))
      .filter((e) => e.actor?.userId === created.userId)
      .map((e) => e.code);
    for (const c of ['login.mfa_required', 'login.bad_totp', 'login.totp_replayed', 'login.succeeded'])
      assert.ok(codes.includes(c), c);
    assert.ok(!JSON.stringify(await auditEntries(core)).includes(code), 'no TOTP code in the audit log');
  });

  test('a project can require MFA of everyone; users without it cannot log in until an MFA reset', async () => {
    await users.create({
      projectId,
      role: 'patient',
      email: 'pat.zzyzx@example.org',
      fhirUser: 'Patient/pat-1',
      password: PASSWORD,
    });
    assert.ok((await login('pat.zzyzx@example.org', PASSWORD)).ok, 'MFA optional by default');
    const policy = await users.setProjectMfaRequired(projectId, true);
    assert.equal(policy.mfaRequired, true);
    assert.ok(policy.usersWithoutMfa >= 1);
    const refused = await login('pat.zzyzx@example.org', PASSWORD);
    assert.ok(
      !refused.ok && refused.reason === 'mfa_not_enrolled' && refused.code === 'MFA_ENROLLMENT_REQUIRED',
    );
    await assert.rejects(
      users.create({
        projectId,
        role: 'patient',
        email: 'pat2.zzyzx@example.org',
        fhirUser: 'Patient/pat-2',
        password: PASSWORD,
      }),
      (e: any) =>
        e.code === 'MFA_ENROLLMENT_REQUIRED' && /project requires MFA/.test(e.details[0].diagnostics),
    );
    const reset = await users.resetMfa({ projectId, email: 'pat.zzyzx@example.org' });
    secrets.push(reset.totpSecret!);
    assert.ok(!(await login('pat.zzyzx@example.org', PASSWORD)).ok, 'now a code is needed');
    assert.ok((await login('pat.zzyzx@example.org', PASSWORD, totpCode(reset.totpSecret!, clock))).ok);
    await users.setProjectMfaRequired(projectId, false);
    const audit = await auditEntries(core);
    assert.equal(audit.filter((e) => e.code === 'project.mfa_policy_changed').length, 2);
    assert.ok(audit.some((e) => e.code === 'user.mfa_reset' && e.action === 'admin'));
  });

  test('sessions end after 15 idle minutes, and after 8 hours whatever the activity', async () => {
    const user = (await users.find({ projectId, email: 'dr.zzyzx@example.org' }))!;
    const { sessionId } = await sessions.create(user, ['pwd']);
    sessionIds.push(sessionId);
    clock += 14 * 60_000;
    const live = await sessions.validate(sessionId);
    assert.ok(live.ok);
    assert.equal(live.session.userId, user.id);
    assert.equal(live.session.fhirUser, 'Practitioner/prac-zzyzx');
    clock += 14 * 60_000;
    assert.ok((await sessions.validate(sessionId)).ok, 'use restarts the idle timer');
    clock += 15 * 60_000 + 1;
    assert.deepEqual(await sessions.validate(sessionId), { ok: false, reason: 'idle' });
    clock += 1;
    assert.deepEqual(await sessions.validate(sessionId), { ok: false, reason: 'idle' }, 'stays ended');

    const busy = await sessions.create(user, ['pwd']);
    sessionIds.push(busy.sessionId);
    const start = clock;
    while (clock < start + 8 * 3_600_000 - 10 * 60_000) {
      clock += 10 * 60_000;
      assert.ok((await sessions.validate(busy.sessionId)).ok);
    }
    clock = start + 8 * 3_600_000;
    assert.deepEqual(await sessions.validate(busy.sessionId), { ok: false, reason: 'expired' });
    assert.deepEqual(await sessions.validate('no-such-session'), { ok: false, reason: 'unknown' });
    const codes = (await auditEntries(core)).map((e) => e.code);
    assert.ok(codes.includes('session.idle') && codes.includes('session.expired'));
  });

  test('deactivating a user ends their sessions at once and refuses their logins', async () => {
    const user = (await users.find({ projectId, email: 'dr.zzyzx@example.org' }))!;
    const a = await sessions.create(user, ['pwd']);
    const b = await sessions.create(user, ['pwd']);
    sessionIds.push(a.sessionId, b.sessionId);
    assert.ok((await sessions.validate(a.sessionId)).ok);
    const r = await users.deactivate({ userId: user.id });
    assert.equal(r.sessionsEnded, 2);
    assert.deepEqual(await sessions.validate(a.sessionId), { ok: false, reason: 'deactivated' });
    assert.deepEqual(await sessions.validate(b.sessionId), { ok: false, reason: 'deactivated' });
    const refused = await login('dr.zzyzx@example.org', PASSWORD);
    assert.ok(!refused.ok && refused.reason === 'inactive' && refused.code === 'LOGIN_FAILED');
    const event = (await auditEntries(core)).find((e) => e.code === 'user.deactivated');
    assert.equal(event.resource.id, user.id);
    assert.equal(event.count, 2);
  });

  test("an administrator's password reset: audited, the old password stops working, sessions end, the lock lifts", async () => {
    const email = 'auditor.zzyzx@example.org';
    const user = (await users.find({ projectId, email }))!;
    const s = await sessions.create(user, ['pwd']);
    sessionIds.push(s.sessionId);
    for (let i = 0; i < 5; i++) await login(email, `guess-number-${i}-wrong`);
    assert.ok(!(await login(email, PASSWORD)).ok, 'locked');
    await assert.rejects(
      users.resetPassword({ userId: user.id }, 'short'),
      (e: any) => e.code === 'PASSWORD_POLICY',
    );
    const r = await users.resetPassword({ userId: user.id }, OTHER_PASSWORD);
    assert.equal(r.sessionsEnded, 1);
    assert.deepEqual(await sessions.validate(s.sessionId), { ok: false, reason: 'password_reset' });
    assert.ok(!(await login(email, PASSWORD)).ok, 'old password refused');
    assert.ok((await login(email, OTHER_PASSWORD)).ok, 'new password works at once: the lock is lifted');
    const event = (await auditEntries(core)).find((e) => e.code === 'user.password_reset');
    assert.equal(event.action, 'admin');
    assert.equal(event.resource.id, user.id);
    assert.ok(!JSON.stringify(event).includes(OTHER_PASSWORD));
  });

  test('an email in two projects needs the project to log in', async () => {
    await core.resourceDb.query(
      `INSERT INTO project (id, name, kind) VALUES ('second-project', 'Second', 'sandbox')`,
    );
    await users.create({
      projectId: 'second-project',
      role: 'auditor',
      email: 'auditor.zzyzx@example.org',
      password: PASSWORD,
    });
    const r = await users.verifyLogin({ email: 'auditor.zzyzx@example.org', password: OTHER_PASSWORD });
    assert.ok(!r.ok && r.reason === 'project_required');
    const inSecond = await users.verifyLogin({
      projectId: 'second-project',
      email: 'auditor.zzyzx@example.org',
      password: PASSWORD,
    });
    assert.ok(inSecond.ok && inSecond.user.projectId === 'second-project');
  });

  test('bad input gets a code naming the problem', async () => {
    const base = { projectId, role: 'practitioner', email: 'bad.zzyzx@example.org', password: PASSWORD };
    const refuses = async (input: Partial<typeof base> & { fhirUser?: string }, code: string, text: RegExp) =>
      assert.rejects(users.create({ ...base, ...input }), (e: any) => {
        assert.equal(e.code, code);
        assert.match(e.details[0]?.diagnostics ?? e.message, text);
        return true;
      });
    await refuses({ password: 'Short-1' }, 'PASSWORD_POLICY', /at least 12 characters/);
    await refuses({ password: 'bad.zzyzx@example.org' }, 'PASSWORD_POLICY', /email/);
    await refuses(
      { password: 'BAD.ZZYZX' + 'aaaa'.slice(0, 0) + '@example.org' },
      'PASSWORD_POLICY',
      /email/,
    );
    await refuses({ password: 'password1234' }, 'PASSWORD_POLICY', /common passwords/);
    await refuses({ password: 'Password2024!' }, 'PASSWORD_POLICY', /common passwords/);
    await refuses({ password: 'aaaaaaaaaaaaaaaa' }, 'PASSWORD_POLICY', /repeated/);
    await refuses({ password: 'x'.repeat(257) + 'y' }, 'PASSWORD_POLICY', /at most 256/);
    await refuses(
      { role: 'superuser' },
      'BAD_REQUEST',
      /role must be one of practitioner, patient, admin, auditor/,
    );
    await refuses({ email: 'not-an-email' }, 'BAD_REQUEST', /not an email address/);
    await refuses({ role: 'patient' }, 'INVALID_FHIR_USER', /patient user must be bound to a Patient/);
    await refuses(
      { role: 'patient', fhirUser: 'Practitioner/p1' },
      'INVALID_FHIR_USER',
      /bound to a Patient/,
    );
    await refuses({ fhirUser: 'Patient/p1' }, 'INVALID_FHIR_USER', /Only patient users/);
    await refuses(
      { fhirUser: 'Observation/o1' },
      'INVALID_FHIR_USER',
      /Patient, Practitioner or RelatedPerson/,
    );
    await refuses({ fhirUser: 'Practitioner/has space' }, 'INVALID_FHIR_USER', /FHIR id/);
    await refuses({ fhirUser: 'Practitioner' }, 'INVALID_FHIR_USER', /FHIR id/);
    await refuses({ projectId: 'no-such-project' }, 'NOT_FOUND', /No such project/);
    await refuses({ email: 'DR.ZZYZX@example.org' }, 'USER_EXISTS', /already exists/);
    const related = await users.create({ ...base, fhirUser: 'RelatedPerson/rp-1' });
    assert.ok(related.userId);
  });

  test('a dump of every table reveals no password, TOTP secret or session id', async () => {
    const dump = await dumpEverything(core);
    for (const p of [PASSWORD, OTHER_PASSWORD]) assert.ok(!dump.includes(p), 'no password');
    assert.ok(secrets.length >= 2);
    for (const s of secrets) assert.ok(!dump.includes(s), 'no TOTP secret');
    assert.ok(sessionIds.length >= 4);
    for (const s of sessionIds) assert.ok(!dump.includes(s), 'no session id');
    const sealed = await core.resourceDb.query<{ mfa_secret: string }>(
      'SELECT mfa_secret FROM app_user WHERE mfa_secret IS NOT NULL',
    );
    assert.ok(sealed.rows.every((r) => /^v1\.[\w-]+\.[\w-]+$/.test(r.mfa_secret)));
    // A sealed secret moved onto another user's row does not open (associated data is the user id).
    const [a, b] = (
      await core.resourceDb.query<{ id: string; mfa_secret: string }>(
        'SELECT id, mfa_secret FROM app_user WHERE mfa_secret IS NOT NULL ORDER BY id',
      )
    ).rows;
    const sealer = TotpSealer.fromKeyFile(dataPaths(loadConfig(storage.env).dataDir).totpKey);
    assert.throws(
      () => sealer.open(a!.id, b!.mfa_secret),
      (e: any) => e.code === 'SEALED_DATA_INVALID',
    );
  });
});

describe('custos user … with storage opened directly', () => {
  let storage: TestStorage;
  let env: Record<string, string>;
  let projectId: string;
  before(async () => {
    storage = await createTestStorage();
    env = storage.env;
    const init = await custos(['init', '--json'], env);
    assert.equal(init.code, 0, init.stderr);
    projectId = JSON.parse(init.stdout).projectId;
  });
  after(async () => {
    await storage?.cleanup();
  });

  test('user create for each role prints { userId } (and with --mfa the TOTP secret once)', async () => {
    const made: Record<string, any> = {};
    for (const [role, extra] of [
      ['practitioner', ['--fhir-user', 'Practitioner/prac-cli']],
      ['patient', ['--fhir-user', 'Patient/pat-cli']],
      ['admin', ['--mfa']],
      ['auditor', []],
    ] as const) {
      const r = await custos(
        [
          'user',
          'create',
          '--project',
          projectId,
          '--role',
          role,
          '--email',
          `${role}.cli@example.org`,
          ...extra,
          '--password-stdin',
          '--json',
        ],
        env,
        `${PASSWORD}\n`,
      );
      assert.equal(r.code, 0, r.stderr);
      assert.match(r.stderr, /opening storage directly/);
      assert.ok(!r.stdout.includes(PASSWORD) && !r.stderr.includes(PASSWORD));
      made[role] = JSON.parse(r.stdout);
    }
    assert.deepEqual(Object.keys(made.practitioner), ['userId']);
    assert.deepEqual(Object.keys(made.admin).sort(), ['totpSecret', 'totpUri', 'userId']);
    assert.match(made.admin.totpSecret, /^[A-Z2-7]{32}$/);

    // The trailing newline of the piped password is not part of it: logging in with it works.
    const core = await openCore(loadConfig(env), silentLogger);
    try {
      const r = await core.users.verifyLogin({
        projectId,
        email: 'auditor.cli@example.org',
        password: PASSWORD,
      });
      assert.ok(r.ok);
      const admin = await core.users.verifyLogin({
        projectId,
        email: 'admin.cli@example.org',
        password: PASSWORD,
        totp: totpCode(made.admin.totpSecret, Date.now()),
      });
      assert.ok(admin.ok);
      const hashes = await core.resourceDb.query<{ password_hash: string }>(
        'SELECT password_hash FROM app_user WHERE password_hash IS NOT NULL',
      );
      assert.equal(hashes.rows.length, 4);
      assert.ok(hashes.rows.every((h) => h.password_hash.startsWith('$argon2id$')));
    } finally {
      await core.close();
    }
  });

  test('bad input exits 2 with a message naming the problem', async () => {
    const create = (args: string[], password = PASSWORD) =>
      custos(['user', 'create', '--project', projectId, ...args, '--password-stdin'], env, password);
    const cases: [Run, RegExp][] = [
      [
        await create(['--role', 'practitioner', '--email', 'weak.cli@example.org'], 'tooshort'),
        /at least 12 characters/,
      ],
      [await create(['--role', 'superuser', '--email', 'role.cli@example.org']), /role must be one of/],
      [
        await create(['--role', 'patient', '--email', 'pat2.cli@example.org', '--fhir-user', 'Patient/']),
        /fhirUser must be/,
      ],
      [await create(['--role', 'auditor', '--email', 'AUDITOR.cli@example.org']), /already exists/],
    ];
    for (const [r, message] of cases) {
      assert.equal(r.code, 2, r.stderr);
      assert.match(r.stderr, message);
      assert.equal(r.stdout, '');
    }
    const noStdin = await custos(
      ['user', 'create', '--project', projectId, '--role', 'auditor', '--email', 'x.cli@example.org'],
      env,
    );
    assert.equal(noStdin.code, 2);
    assert.match(noStdin.stderr, /--password-stdin is required/);
    const noUser = await custos(['user', 'deactivate', '--email', 'x.cli@example.org'], env);
    assert.equal(noUser.code, 2);
    assert.match(noUser.stderr, /--user ID, or with --project P --email E/);
  });

  test('reset-password, reset-mfa, mfa-policy and deactivate', async () => {
    const ref = ['--project', projectId, '--email', 'practitioner.cli@example.org'];
    const pw = await custos(
      ['user', 'reset-password', ...ref, '--password-stdin', '--json'],
      env,
      OTHER_PASSWORD,
    );
    assert.equal(pw.code, 0, pw.stderr);
    const userId = JSON.parse(pw.stdout).userId;
    const mfa = await custos(['user', 'reset-mfa', '--user', userId, '--json'], env);
    assert.equal(mfa.code, 0, mfa.stderr);
    assert.match(JSON.parse(mfa.stdout).totpSecret, /^[A-Z2-7]{32}$/);
    const policy = await custos(['user', 'mfa-policy', '--project', projectId, '--required', '--json'], env);
    assert.equal(policy.code, 0, policy.stderr);
    assert.equal(JSON.parse(policy.stdout).mfaRequired, true);
    const deact = await custos(['user', 'deactivate', '--user', userId, '--json'], env);
    assert.equal(deact.code, 0, deact.stderr);
    assert.deepEqual(JSON.parse(deact.stdout), { userId, sessionsEnded: 0 });
    const unknown = await custos(['user', 'deactivate', '--user', 'no-such-user'], env);
    assert.equal(unknown.code, 2);
    assert.match(unknown.stderr, /No such user/);
  });
});

describe('users through the admin API (server running)', () => {
  let h: Harness;
  let adminToken: string;
  const admin = (p: string, body: unknown, token = adminToken) =>
    fetch(`${h.server.url}${p}`, {
      method: 'POST',
      headers: { 'content-type': 'application/json', [ADMIN_TOKEN_HEADER]: token },
      body: JSON.stringify(body),
    });
  before(async () => {
    h = await startHarness();
    adminToken = fs.readFileSync(dataPaths(h.config.dataDir).adminToken, 'utf8').trim();
  });
  after(async () => {
    await h?.close();
  });

  test('POST /admin/users creates users of each role; the CLI uses the API while the server runs', async () => {
    const projectId = h.init.projectId;
    for (const [role, extra] of [
      ['practitioner', { fhirUser: 'Practitioner/prac-api' }],
      ['patient', { fhirUser: 'Patient/pat-api' }],
      ['admin', { mfa: true }],
      ['auditor', {}],
    ] as const) {
      const res = await admin('/admin/users', {
        projectId,
        role,
        email: `${role}.api@example.org`,
        password: PASSWORD,
        ...extra,
      });
      assert.equal(res.status, 200, role);
      const body = (await res.json()) as Record<string, string>;
      assert.ok(body.userId);
      assert.equal(body.totpSecret !== undefined, role === 'admin');
    }
    const viaCli = await custos(
      [
        'user',
        'create',
        '--project',
        projectId,
        '--role',
        'practitioner',
        '--email',
        'cli.api@example.org',
        '--password-stdin',
        '--json',
      ],
      h.storage.env,
      PASSWORD,
    );
    assert.equal(viaCli.code, 0, viaCli.stderr);
    assert.match(viaCli.stderr, /using the running server's admin API/);
    const dup = await custos(
      [
        'user',
        'create',
        '--project',
        projectId,
        '--role',
        'practitioner',
        '--email',
        'cli.api@example.org',
        '--password-stdin',
      ],
      h.storage.env,
      PASSWORD,
    );
    assert.equal(dup.code, 2);
    assert.match(dup.stderr, /already exists/);
    const r = await h.server.core.users.verifyLogin({
      projectId,
      email: 'cli.api@example.org',
      password: PASSWORD,
    });
    assert.ok(r.ok);
    assert.ok(!h.logLines.join('\n').includes(PASSWORD), 'no password in the server log');
  });

  test('bad requests get OperationOutcomes with the code; without the admin token: 401', async () => {
    const projectId = h.init.projectId;
    const outcome = async (res: Response) => {
      const body = (await res.json()) as any;
      return {
        status: res.status,
        code: body.issue[0].details.coding[0].code,
        text: body.issue[0].diagnostics,
      };
    };
    assert.deepEqual(
      await outcome(
        await admin('/admin/users', {
          projectId,
          role: 'auditor',
          email: 'weak.api@example.org',
          password: 'short',
        }),
      ),
      { status: 400, code: 'PASSWORD_POLICY', text: 'The password must be at least 12 characters long.' },
    );
    assert.equal(
      (
        await outcome(
          await admin('/admin/users', {
            projectId,
            role: 'auditor',
            email: 'auditor.api@example.org',
            password: PASSWORD,
          }),
        )
      ).code,
      'USER_EXISTS',
    );
    assert.equal(
      (
        await outcome(
          await admin('/admin/users', { projectId, role: 7, email: 'r.api@example.org', password: PASSWORD }),
        )
      ).code,
      'BAD_REQUEST',
    );
    assert.equal((await outcome(await admin('/admin/users/deactivate', {}))).code, 'BAD_REQUEST');
    assert.equal(
      (await outcome(await admin('/admin/projects/mfa', { projectId, required: 'yes' }))).code,
      'BAD_REQUEST',
    );
    const forged = await admin(
      '/admin/users',
      { projectId, role: 'admin', email: 'evil.api@example.org', password: PASSWORD, mfa: true },
      'forged-token',
    );
    assert.equal((await outcome(forged)).code, 'ADMIN_TOKEN_INVALID');
    assert.equal(forged.status, 401);
    assert.equal(await h.server.core.users.find({ projectId, email: 'evil.api@example.org' }), undefined);
  });

  test('reset-password, reset-mfa and deactivate through the API are audited admin actions', async () => {
    const projectId = h.init.projectId;
    const ref = { projectId, email: 'practitioner.api@example.org' };
    assert.equal(
      (await admin('/admin/users/reset-password', { ...ref, password: OTHER_PASSWORD })).status,
      200,
    );
    const mfa = (await (await admin('/admin/users/reset-mfa', ref)).json()) as {
      userId: string;
      totpSecret: string;
    };
    assert.match(mfa.totpSecret, /^[A-Z2-7]{32}$/);
    const login = await h.server.core.users.verifyLogin({
      ...ref,
      password: OTHER_PASSWORD,
      totp: totpCode(mfa.totpSecret, Date.now()),
    });
    assert.ok(login.ok);
    const session = await h.server.core.sessions.create(login.user, login.amr);
    const deact = (await (await admin('/admin/users/deactivate', { userId: mfa.userId })).json()) as any;
    assert.equal(deact.sessionsEnded, 1);
    assert.equal((await h.server.core.sessions.validate(session.sessionId)).ok, false);
    assert.equal((await admin('/admin/projects/mfa', { projectId, required: true })).status, 200);
    const entries = await auditEntries(h.server.core);
    for (const code of [
      'user.created',
      'user.password_reset',
      'user.mfa_reset',
      'user.deactivated',
      'project.mfa_policy_changed',
    ]) {
      const e = entries.find((x) => x.code === code);
      assert.ok(e, code);
      assert.equal(e.action, 'admin');
      assert.equal(e.outcome, 'success');
    }
    assert.ok(!JSON.stringify(entries).includes(OTHER_PASSWORD));
  });
});

test('session limits are configuration: defaults 15 minutes and 8 hours; bad values name the variable', () => {
  const base = { CUSTOS_DATA_DIR: '/tmp/custos-users-config' };
  const c = loadConfig(base);
  assert.equal(c.sessionIdleMinutes, 15);
  assert.equal(c.sessionMaxHours, 8);
  const set = loadConfig({ ...base, CUSTOS_SESSION_IDLE_MINUTES: '30', CUSTOS_SESSION_MAX_HOURS: '12' });
  assert.deepEqual([set.sessionIdleMinutes, set.sessionMaxHours], [30, 12]);
  assert.throws(
    () => loadConfig({ ...base, CUSTOS_SESSION_IDLE_MINUTES: '0' }),
    /CUSTOS_SESSION_IDLE_MINUTES/,
  );
  assert.throws(() => loadConfig({ ...base, CUSTOS_SESSION_MAX_HOURS: 'eight' }), /CUSTOS_SESSION_MAX_HOURS/);
  assert.throws(
    () => loadConfig({ ...base, CUSTOS_SESSION_IDLE_MINUTES: '600', CUSTOS_SESSION_MAX_HOURS: '8' }),
    /CUSTOS_SESSION_IDLE_MINUTES: must not exceed CUSTOS_SESSION_MAX_HOURS/,
  );
});
