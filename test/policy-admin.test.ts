import { after, before, describe, test } from 'node:test';
import assert from 'node:assert/strict';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { dataPaths } from '../src/server.ts';
import { ADMIN_TOKEN_HEADER } from '../src/admin/admin-routes.ts';
import { PhiGateway } from '../src/phi/gateway.ts';
import { validateResource } from '../src/fhir/validator.ts';
import { isResourceType, RESOURCE_TYPES } from '../src/fhir/resource-types.ts';
import { createLogger } from '../src/log/logger.ts';
import {
  DEFAULT_POLICIES,
  type BreakGlassAlert,
  type RolePolicy,
  type StoredPolicy,
} from '../src/phi/access-policy.ts';
import type { AuditEvent } from '../src/audit/audit-event.ts';
import type { SqlQueryable } from '../src/store/sql-driver.ts';
import { startHarness, type Harness } from './support/harness.ts';
import { createTestStorage, type TestStorage } from './support/storage.ts';
import { runCustos } from './support/custos-cli.ts';
import { facts, labelled, statusOf, systemPrincipal, userPrincipal } from './support/access-fixture.ts';

// Access policies and break-glass alerts through the admin API and `custos policy` / `custos
// break-glass` (issue 6, docs/access-policies.md): versioned, audited, in force, invalid ones refused
// with the reason; alerts reviewed once. On embedded storage or, with CUSTOS_TEST_DATABASE_URL,
// PostgreSQL.

async function auditEvents(db: SqlQueryable): Promise<AuditEvent[]> {
  const r = await db.query<{ entry: Uint8Array }>('SELECT entry FROM audit_entry ORDER BY seq');
  return r.rows.map((x) => JSON.parse(Buffer.from(x.entry).toString('utf8')) as AuditEvent);
}

/** The practitioner default, and a version of it that denies every Observation. */
const noObservations: RolePolicy = {
  ...DEFAULT_POLICIES.practitioner,
  rules: [
    ...DEFAULT_POLICIES.practitioner.rules,
    { effect: 'deny', types: ['Observation'], interactions: 'cruds' },
  ],
};

describe('policies and break-glass through the running server (admin API and CLI)', () => {
  let h: Harness;
  let projectId: string;
  let dir: string;
  let token: string;
  const api = async (p: string, body: unknown, t = token) => {
    const res = await fetch(`${h.server.url}${p}`, {
      method: 'POST',
      headers: { 'content-type': 'application/json', [ADMIN_TOKEN_HEADER]: t },
      body: JSON.stringify(body),
    });
    return { status: res.status, json: (await res.json()) as any };
  };
  /** A gateway over the server's storage, as a request handler would build it (fresh policy cache). */
  const gateway = () =>
    new PhiGateway({
      db: h.server.core.resourceDb,
      audit: h.server.core.audit,
      log: createLogger({ level: 'silent' }),
      validate: validateResource,
      isResourceType,
      resourceTypes: RESOURCE_TYPES,
      fhirBaseUrl: h.base,
      encryption: h.server.core.encryption,
    });
  const doc = () =>
    userPrincipal(projectId, { role: 'practitioner', fhirUser: 'Practitioner/doc', scopes: 'user/*.cruds' });

  before(async () => {
    h = await startHarness();
    projectId = h.init.projectId;
    token = fs.readFileSync(dataPaths(h.config.dataDir).adminToken, 'utf8').trim();
    dir = fs.mkdtempSync(path.join(os.tmpdir(), 'custos-policy-'));
    const sys = gateway().session(systemPrincipal(projectId), facts('TREAT'));
    await sys.update('Practitioner', 'doc', labelled({ resourceType: 'Practitioner', id: 'doc' }));
    await sys.update(
      'Patient',
      'mine',
      labelled({
        resourceType: 'Patient',
        id: 'mine',
        generalPractitioner: [{ reference: 'Practitioner/doc' }],
      }),
    );
    await sys.update('Patient', 'stranger', labelled({ resourceType: 'Patient', id: 'stranger' }));
    await sys.update(
      'Observation',
      'obs',
      labelled({
        resourceType: 'Observation',
        id: 'obs',
        status: 'final',
        code: { coding: [{ system: 'http://loinc.org', code: '2345-7' }] },
        subject: { reference: 'Patient/mine' },
      }),
    );
  });
  after(async () => {
    await h?.close();
    if (dir) fs.rmSync(dir, { recursive: true, force: true });
  });

  test('criteria on an encrypted parameter are refused when the policy is saved (they could never match)', async () => {
    assert.ok(h.server.core.encryption, 'field encryption is on in this server');
    const onSsn: RolePolicy = {
      ...DEFAULT_POLICIES.practitioner,
      rules: [
        ...DEFAULT_POLICIES.practitioner.rules,
        {
          effect: 'deny',
          types: ['Patient'],
          interactions: 'rs',
          criteria: 'identifier=http://hl7.org/fhir/sid/us-ssn|',
        },
      ],
    };
    const r = await api('/admin/policies/set', { projectId, role: 'practitioner', policy: onSsn });
    assert.equal(r.status, 400);
    assert.match(JSON.stringify(r.json), /identifier.*encrypted/);
    // A rule on a parameter that is not encrypted is accepted (the control).
    const onCategory: RolePolicy = {
      ...DEFAULT_POLICIES.practitioner,
      rules: [
        ...DEFAULT_POLICIES.practitioner.rules,
        { effect: 'deny', types: ['Observation'], interactions: 'rs', criteria: 'category=imaging' },
      ],
    };
    const ok = await api('/admin/policies/set', {
      projectId,
      role: 'auditor',
      policy: { ...onCategory, purposes: ['HCOMPL'], breakGlass: false },
    });
    assert.equal(ok.status, 200, JSON.stringify(ok.json));
  });

  test('POST /admin/policies/*: list, set (a new version, audited, in force), show a version; bad input refused', async () => {
    const listed = await api('/admin/policies/list', { projectId });
    assert.equal(listed.status, 200);
    const byRole = new Map((listed.json.policies as StoredPolicy[]).map((p) => [p.role, p]));
    assert.deepEqual([...byRole.keys()].sort(), ['admin', 'auditor', 'patient', 'practitioner']);
    assert.equal(byRole.get('practitioner')!.version, 0, 'the built-in default until a project sets one');
    assert.equal((await gateway().session(doc(), facts('TREAT')).read('Observation', 'obs')).status, 200);

    const auditBefore = (await auditEvents(h.server.core.auditDb)).length;
    const set = await api('/admin/policies/set', {
      projectId,
      role: 'practitioner',
      policy: noObservations,
      changedBy: 'dana',
    });
    assert.equal(set.status, 200, JSON.stringify(set.json));
    assert.equal(set.json.version, 1);
    assert.equal(set.json.changedBy, 'dana');
    const changed = (await auditEvents(h.server.core.auditDb))
      .slice(auditBefore)
      .filter((e) => e.code === 'policy.changed');
    assert.equal(changed.length, 1, 'the change is audited');
    assert.equal(changed[0]!.action, 'admin');
    assert.equal(changed[0]!.projectId, projectId);
    assert.deepEqual(changed[0]!.resource, { type: 'AccessPolicy', id: 'practitioner/1' });

    // In force: Observations are now out of reach whatever the patient (403); the Patient is not.
    assert.equal(
      await statusOf(() => gateway().session(doc(), facts('TREAT')).read('Observation', 'obs')),
      403,
    );
    assert.equal((await gateway().session(doc(), facts('TREAT')).read('Patient', 'mine')).status, 200);

    const back = await api('/admin/policies/set', {
      projectId,
      role: 'practitioner',
      policy: DEFAULT_POLICIES.practitioner,
    });
    assert.equal(back.json.version, 2, 'a change never overwrites an earlier version');
    assert.equal(back.json.changedBy, 'installation-admin');
    assert.equal((await gateway().session(doc(), facts('TREAT')).read('Observation', 'obs')).status, 200);

    const v1 = await api('/admin/policies/show', { projectId, role: 'practitioner', version: 1 });
    assert.equal(v1.status, 200);
    assert.deepEqual(v1.json.policy, noObservations, 'an earlier version is kept whole');
    assert.equal(v1.json.current, 2);
    assert.deepEqual(
      (v1.json.history as { version: number }[]).map((x) => x.version),
      [2, 1],
    );
    const missing = await api('/admin/policies/show', { projectId, role: 'practitioner', version: 9 });
    assert.equal(missing.status, 404);
    assert.match(missing.json.issue[0].diagnostics, /no version 9/);

    const auditMid = (await auditEvents(h.server.core.auditDb)).length;
    const bad = await api('/admin/policies/set', {
      projectId,
      role: 'practitioner',
      policy: {
        ...DEFAULT_POLICIES.practitioner,
        rules: [{ effect: 'allow', types: ['Nope'], interactions: 'r' }],
      },
    });
    assert.equal(bad.status, 400);
    assert.equal(bad.json.issue[0].details.coding[0].code, 'POLICY_INVALID');
    assert.match(bad.json.issue[0].diagnostics, /Rule 0: an entry of types is not a resource type/);
    for (const [body, status] of [
      [{ projectId, role: 'nurse', policy: DEFAULT_POLICIES.practitioner }, 400],
      [{ projectId: 'no-such-project', role: 'patient', policy: DEFAULT_POLICIES.patient }, 404],
      [{ projectId, role: 'patient' }, 400],
    ] as const) {
      const r = await api('/admin/policies/set', body);
      assert.equal(r.status, status, JSON.stringify(body));
    }
    const denied = await api(
      '/admin/policies/set',
      { projectId, role: 'patient', policy: DEFAULT_POLICIES.patient },
      'wrong',
    );
    assert.equal(denied.status, 401);
    assert.equal(
      (await api('/admin/policies/show', { projectId, role: 'practitioner' })).json.version,
      2,
      'nothing refused was stored',
    );
    assert.equal(
      (await auditEvents(h.server.core.auditDb)).slice(auditMid).filter((e) => e.code === 'policy.changed')
        .length,
      0,
      'nor audited as a change',
    );
  });

  test('custos policy set / show / list through the admin API; an invalid file is exit 2 naming the problem', async () => {
    const env = h.storage.env;
    const file = path.join(dir, 'policy.json');
    fs.writeFileSync(file, JSON.stringify(noObservations));
    const set = await runCustos(
      ['policy', 'set', '--project', projectId, '--role', 'practitioner', '--file', file, '--json'],
      env,
    );
    assert.equal(set.code, 0, set.stderr);
    assert.match(set.stderr, /admin API/);
    const stored = JSON.parse(set.stdout) as StoredPolicy;
    assert.equal(stored.version, 3);
    assert.equal(
      await statusOf(() => gateway().session(doc(), facts('TREAT')).read('Observation', 'obs')),
      403,
    );

    const shown = await runCustos(
      ['policy', 'show', '--project', projectId, '--role', 'practitioner', '--version', '1'],
      env,
    );
    assert.equal(shown.code, 0, shown.stderr);
    assert.match(shown.stdout, /practitioner \(version 1, set by dana at /);
    assert.match(shown.stdout, /deny +cruds Observation/);
    assert.match(shown.stdout, /not in force: version 3 is/);
    const list = await runCustos(['policy', 'list', '--project', projectId, '--json'], env);
    assert.equal(list.code, 0, list.stderr);
    const policies = (JSON.parse(list.stdout) as { policies: StoredPolicy[] }).policies;
    assert.equal(policies.find((p) => p.role === 'practitioner')!.version, 3);

    const invalid = path.join(dir, 'invalid.json');
    fs.writeFileSync(invalid, JSON.stringify({ ...noObservations, purposes: ['TREAT', 'ETREAT'] }));
    const refused = await runCustos(
      ['policy', 'set', '--project', projectId, '--role', 'practitioner', '--file', invalid],
      env,
    );
    assert.equal(refused.code, 2);
    assert.equal(refused.stdout, '');
    assert.match(
      refused.stderr,
      /The access policy is not valid\..*Break-glass purposes are not listed in purposes/,
    );
    const notJson = path.join(dir, 'not.json');
    fs.writeFileSync(notJson, '{ rules: ');
    for (const args of [
      ['policy', 'set', '--project', projectId, '--role', 'practitioner', '--file', notJson],
      [
        'policy',
        'set',
        '--project',
        projectId,
        '--role',
        'practitioner',
        '--file',
        path.join(dir, 'absent.json'),
      ],
      ['policy', 'set', '--project', projectId, '--role', 'nurse', '--file', file],
      ['policy', 'show', '--project', projectId, '--role', 'practitioner', '--version', 'latest'],
      ['policy', 'show', '--project', projectId],
      ['policy', 'list'],
    ]) {
      const r = await runCustos(args, env);
      assert.equal(r.code, 2, `${args.join(' ')}: ${r.stderr}`);
      assert.equal(r.stdout, '');
    }
    const after = await runCustos(
      ['policy', 'show', '--project', projectId, '--role', 'practitioner', '--json'],
      env,
    );
    assert.equal((JSON.parse(after.stdout) as StoredPolicy).version, 3, 'nothing refused was stored');
  });

  test('break-glass: the alert is listed pending, reviewed once through the CLI (audited), then listed reviewed', async () => {
    const env = h.storage.env;
    const f = facts('ETREAT', 'Unresponsive patient, no record of their care team');
    assert.equal((await gateway().session(doc(), f).read('Patient', 'stranger')).status, 200);
    const pending = await runCustos(['break-glass', 'list', '--pending', '--json'], env);
    assert.equal(pending.code, 0, pending.stderr);
    const alerts = (JSON.parse(pending.stdout) as { alerts: BreakGlassAlert[] }).alerts;
    assert.equal(alerts.length, 1);
    const alert = alerts[0]!;
    assert.equal(alert.requestId, f.requestId);
    assert.equal(alert.userId, doc().userId);
    assert.equal(alert.outcome, undefined);
    assert.ok(!pending.stdout.includes('Unresponsive'), 'the reason is sealed in the audit log, not listed');
    const human = await runCustos(['break-glass', 'list'], env);
    assert.match(human.stdout, /PENDING REVIEW/);

    for (const args of [
      ['break-glass', 'review', '--id', alert.id, '--outcome', 'maybe'],
      ['break-glass', 'review', '--id', 'no-such-alert', '--outcome', 'justified'],
      ['break-glass', 'review', '--outcome', 'justified'],
    ]) {
      const r = await runCustos(args, env);
      assert.equal(r.code, 2, `${args.join(' ')}: ${r.stderr}`);
      assert.equal(r.stdout, '');
    }
    const auditBefore = (await auditEvents(h.server.core.auditDb)).length;
    const reviewed = await runCustos(
      ['break-glass', 'review', '--id', alert.id, '--outcome', 'not-justified', '--json'],
      env,
    );
    assert.equal(reviewed.code, 0, reviewed.stderr);
    const done = JSON.parse(reviewed.stdout) as BreakGlassAlert;
    assert.equal(done.outcome, 'not-justified');
    assert.ok(done.reviewedAt && done.reviewedBy);
    const events = (await auditEvents(h.server.core.auditDb)).slice(auditBefore);
    const ev = events.find((e) => e.code === 'break_glass.reviewed');
    assert.ok(ev, 'the review is audited');
    assert.deepEqual(ev.resource, { type: 'BreakGlass', id: alert.id });
    assert.equal(ev.count, 0, 'the finding: not justified');

    const again = await runCustos(['break-glass', 'review', '--id', alert.id, '--outcome', 'justified'], env);
    assert.equal(again.code, 2);
    assert.match(again.stderr, /already been reviewed/);
    const viaApi = await api('/admin/break-glass/review', { id: alert.id, outcome: 'justified' });
    assert.equal(viaApi.status, 409);
    assert.equal(
      (await api('/admin/break-glass/list', { pending: true })).json.alerts.length,
      0,
      'nothing pending once reviewed',
    );
    const all = await api('/admin/break-glass/list', { projectId });
    assert.equal(all.json.alerts[0].outcome, 'not-justified', 'the first finding stands');
  });
});

describe('custos policy and break-glass with storage opened directly', () => {
  let storage: TestStorage;
  let dir: string;
  before(async () => {
    storage = await createTestStorage();
    dir = fs.mkdtempSync(path.join(os.tmpdir(), 'custos-policy-direct-'));
  });
  after(async () => {
    await storage?.cleanup();
    if (dir) fs.rmSync(dir, { recursive: true, force: true });
  });

  test('set, show, list; --help; break-glass list; usage and unknown things exit 2', async () => {
    const env = storage.env;
    const init = await runCustos(['init', '--json'], env);
    assert.equal(init.code, 0, init.stderr);
    const { projectId } = JSON.parse(init.stdout) as { projectId: string };
    const file = path.join(dir, 'patient.json');
    const policy: RolePolicy = { ...DEFAULT_POLICIES.patient, purposes: ['PATRQT', 'FAMRQT'] };
    fs.writeFileSync(file, JSON.stringify(policy));
    const set = await runCustos(
      ['policy', 'set', '--project', projectId, '--role', 'patient', '--file', file, '--json'],
      env,
    );
    assert.equal(set.code, 0, set.stderr);
    assert.match(set.stderr, /opening storage directly/);
    assert.equal((JSON.parse(set.stdout) as StoredPolicy).version, 1);
    const shown = await runCustos(
      ['policy', 'show', '--project', projectId, '--role', 'patient', '--json'],
      env,
    );
    assert.equal(shown.code, 0, shown.stderr);
    const s = JSON.parse(shown.stdout) as StoredPolicy & { history: unknown[] };
    assert.deepEqual(s.policy.purposes, ['PATRQT', 'FAMRQT']);
    assert.equal(s.history.length, 1);
    const dflt = await runCustos(
      ['policy', 'show', '--project', projectId, '--role', 'patient', '--version', '0', '--json'],
      env,
    );
    assert.deepEqual((JSON.parse(dflt.stdout) as StoredPolicy).policy, DEFAULT_POLICIES.patient);
    const list = await runCustos(['policy', 'list', '--project', projectId], env);
    assert.equal(list.code, 0, list.stderr);
    assert.match(list.stdout, /patient \(version 1, set by /);
    assert.match(list.stdout, /practitioner \(built-in default\)/);

    const glass = await runCustos(['break-glass', 'list', '--json'], env);
    assert.equal(glass.code, 0, glass.stderr);
    assert.deepEqual(JSON.parse(glass.stdout), { alerts: [] });

    for (const args of [
      ['policy', '--help'],
      ['policy', 'set', '--help'],
      ['break-glass', 'review', '--help'],
    ]) {
      const r = await runCustos(args, env);
      assert.equal(r.code, 0, `${args.join(' ')}: ${r.stderr}`);
      assert.match(r.stdout, /Usage: custos/);
    }
    const bad = path.join(dir, 'bad.json');
    fs.writeFileSync(
      bad,
      JSON.stringify({
        rules: [{ effect: 'allow', types: ['*'], interactions: 'r', criteria: 'status=final' }],
        purposes: [],
        breakGlass: false,
      }),
    );
    for (const [args, message] of [
      [
        ['policy', 'set', '--project', projectId, '--role', 'patient', '--file', bad],
        /criteria need exactly one type/,
      ],
      [['policy', 'set', '--project', 'nope', '--role', 'patient', '--file', file], /No such project/],
      [['policy', 'show', '--project', projectId, '--role', 'patient', '--version', '7'], /no version 7/],
      [
        ['break-glass', 'review', '--id', 'nope', '--outcome', 'justified'],
        /No break-glass alert with this id/,
      ],
      [
        ['break-glass', 'review', '--id', 'nope', '--outcome', 'fine'],
        /--outcome must be justified or not-justified/,
      ],
      [['policy', 'frobnicate'], /unknown command/],
    ] as const) {
      const r = await runCustos([...args], env);
      assert.equal(r.code, 2, `${args.join(' ')}: ${r.stderr}`);
      assert.match(r.stderr, message);
      assert.equal(r.stdout, '');
    }
  });
});
