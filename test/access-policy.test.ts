import { after, before, describe, test } from 'node:test';
import assert from 'node:assert/strict';
import fc from 'fast-check';
import type { PhiGateway, Principal } from '../src/phi/gateway.ts';
import {
  and,
  criteriaPredicate,
  DEFAULT_POLICIES,
  evaluate,
  listBreakGlass,
  listPolicies,
  not,
  or,
  reviewBreakGlass,
  setPolicy,
  showPolicy,
  validatePolicy,
} from '../src/phi/access-policy.ts';
import { predicateSql, type AccessPredicate } from '../src/store/search-sql.ts';
import { extractSearchIndex } from '../src/fhir/search-index.ts';
import { isResourceType } from '../src/fhir/resource-types.ts';
import { covers, parseSmartScope, allows } from '../src/auth/smart-scopes.ts';
import {
  BASE,
  facts,
  labelled,
  openAccessFixture,
  statusOf,
  systemPrincipal,
  userPrincipal,
  type AccessFixture,
} from './support/access-fixture.ts';

const CAT = 'http://terminology.hl7.org/CodeSystem/observation-category';
const obs = (patient: string, category: string, status = 'final') =>
  labelled({
    resourceType: 'Observation',
    status,
    category: [{ coding: [{ system: CAT, code: category }] }],
    code: { coding: [{ system: 'http://loinc.org', code: '2345-7' }] },
    subject: { reference: `Patient/${patient}` },
  });

let fx: AccessFixture;
let gw: PhiGateway;

before(async () => {
  fx = await openAccessFixture();
  gw = fx.gateway({ breakGlassMinutes: 60 });
  const sys = gw.session(systemPrincipal(fx.projectA), facts('TREAT'));
  await sys.update('Practitioner', 'doc', labelled({ resourceType: 'Practitioner', id: 'doc' }));
  await sys.update('Practitioner', 'doc2', labelled({ resourceType: 'Practitioner', id: 'doc2' }));
  await sys.update(
    'Patient',
    'gp',
    labelled({ resourceType: 'Patient', id: 'gp', generalPractitioner: [{ reference: 'Practitioner/doc' }] }),
  );
  await sys.update('Patient', 'team', labelled({ resourceType: 'Patient', id: 'team' }));
  await sys.update('Patient', 'other', labelled({ resourceType: 'Patient', id: 'other' }));
  await sys.update(
    'CareTeam',
    'ct',
    labelled({
      resourceType: 'CareTeam',
      id: 'ct',
      subject: { reference: 'Patient/team' },
      participant: [{ member: { reference: 'Practitioner/doc' } }],
    }),
  );
  for (const p of ['gp', 'team', 'other'])
    for (const [c, s] of [
      ['laboratory', 'final'],
      ['vital-signs', 'final'],
      ['laboratory', 'cancelled'],
      ['imaging', 'preliminary'],
    ])
      await sys.create('Observation', obs(p, c!, s));
});
after(async () => {
  await fx?.close();
});

const doc = (project = fx.projectA) =>
  userPrincipal(project, { role: 'practitioner', fhirUser: 'Practitioner/doc', scopes: 'user/*.cruds' });

describe('care team: generalPractitioner or CareTeam participant', () => {
  test('a practitioner reads the patients they are GP of or on the care team of, not others', async () => {
    const s = () => gw.session(doc(), facts('TREAT'));
    assert.equal((await s().read('Patient', 'gp')).status, 200);
    assert.equal((await s().read('Patient', 'team')).status, 200);
    assert.equal(await statusOf(() => s().read('Patient', 'other')), 404);
    const r = await s().search(BASE, {
      type: 'Observation',
      query: new URLSearchParams('_total=accurate'),
      strict: false,
      path: '/Observation',
    });
    const b = JSON.parse(r.body!);
    assert.equal(b.total, 8);
  });

  test('a change of care team made through the gateway takes effect at once (no stale cache)', async () => {
    const sys = () => gw.session(systemPrincipal(fx.projectA), facts('TREAT'));
    const s = () => gw.session(doc(), facts('TREAT'));
    await sys().update('Patient', 'moving', labelled({ resourceType: 'Patient', id: 'moving' }));
    assert.equal(await statusOf(() => s().read('Patient', 'moving')), 404);
    const inCare = { generalPractitioner: [{ reference: 'Practitioner/doc' }] };
    await sys().update('Patient', 'moving', labelled({ resourceType: 'Patient', id: 'moving', ...inCare }));
    assert.equal((await s().read('Patient', 'moving')).status, 200);
    await sys().update('Patient', 'moving', labelled({ resourceType: 'Patient', id: 'moving' }));
    assert.equal(await statusOf(() => s().read('Patient', 'moving')), 404, 'out of care: out of reach');
    await sys().delete('Patient', 'moving');
  });

  test('a refusal outside the policy is audited as refused, answered as not found', async () => {
    const f = facts('TREAT');
    await statusOf(() => gw.session(doc(), f).read('Patient', 'other'));
    const e = fx.events.find((x) => x.e.requestId === f.requestId)!.e;
    assert.equal(e.outcome, 'refused');
    assert.equal(e.code, 'FORBIDDEN_POLICY');
    assert.deepEqual(e.patients, ['other']);
  });
});

describe('break-glass', () => {
  test('a practitioner breaking the glass reads beyond their patients, every event flagged, one alert', async () => {
    const before = (await listBreakGlass({ db: fx.core.resourceDb }, { projectId: fx.projectA })).length;
    const reasons = 'Unconscious patient in the emergency department';
    const f1 = facts('ETREAT', reasons);
    const r = await gw.session(doc(), f1).read('Patient', 'other');
    assert.equal(r.status, 200);
    const f2 = facts('ETREAT', reasons);
    const s = await gw.session(doc(), f2).search(BASE, {
      type: 'Observation',
      query: new URLSearchParams('_total=accurate&subject=Patient/other'),
      strict: false,
      path: '/Observation',
    });
    assert.equal(JSON.parse(s.body!).total, 4);
    for (const id of [f1.requestId, f2.requestId]) {
      const evs = fx.events.filter((x) => x.e.requestId === id);
      assert.ok(evs.length > 0);
      for (const x of evs) {
        assert.equal(x.e.purpose, 'ETREAT', 'flagged by its purpose');
        assert.equal(
          x.sensitive?.breakGlassReason,
          reasons,
          'the reason is sealed into the event, not in clear',
        );
        assert.ok(!JSON.stringify(x.e).includes('Unconscious'));
      }
    }
    const alerts = await listBreakGlass(
      { db: fx.core.resourceDb },
      { projectId: fx.projectA, pending: true },
    );
    assert.equal(alerts.length, before + 1, 'one grant (one alert) for both requests within the window');
    assert.equal(alerts[0]!.requestId, f1.requestId);
    assert.equal(alerts[0]!.userId, doc().userId);
  });

  test('the grant is time-boxed: after it ends, breaking the glass again raises a new alert', async () => {
    const n = (await listBreakGlass({ db: fx.core.resourceDb }, { projectId: fx.projectA })).length;
    fx.clock.now = new Date(fx.clock.now.getTime() + 61 * 60_000);
    await gw.session(doc(), facts('ETREAT', 'still in the emergency')).read('Patient', 'other');
    assert.equal(
      (await listBreakGlass({ db: fx.core.resourceDb }, { projectId: fx.projectA })).length,
      n + 1,
    );
  });

  test('break-glass without a reason, by a patient, an admin or a system client registered for it: refused', async () => {
    assert.equal(await statusOf(() => gw.session(doc(), facts('ETREAT')).read('Patient', 'other')), 403);
    const pat = userPrincipal(fx.projectA, {
      role: 'patient',
      fhirUser: 'Patient/gp',
      scopes: 'patient/*.rs',
    });
    assert.equal(await statusOf(() => gw.session(pat, facts('ETREAT', 'x')).read('Patient', 'other')), 403);
    const admin = userPrincipal(fx.projectA, { role: 'admin', scopes: 'user/*.cruds' });
    assert.equal(await statusOf(() => gw.session(admin, facts('ETREAT', 'x')).read('Patient', 'other')), 403);
    const sys = systemPrincipal(fx.projectA, 'system/*.cruds', ['TREAT', 'ETREAT'], true);
    const f = facts('ETREAT', 'x');
    assert.equal(await statusOf(() => gw.session(sys, f).read('Patient', 'other')), 403);
    assert.equal(fx.events.find((x) => x.e.requestId === f.requestId)?.e.code, 'BREAK_GLASS_NOT_ALLOWED');
  });

  test('break-glass does not reach the audit log, nor write to it, nor widen patient-context scopes', async () => {
    const s = () => gw.session(doc(), facts('ETREAT', 'emergency'));
    // The practitioner role has no rule on AuditEvent ('*' never covers it): refused by the policy.
    await assert.rejects(s().auditReader('s'), (e: { code?: string }) => e.code === 'FORBIDDEN_POLICY');
    // Even a role granted the audit log cannot read it by breaking the glass: ETREAT is not an
    // audit-reading purpose.
    const deps = { db: fx.core.resourceDb, audit: fx.core.audit, isResourceType };
    await setPolicy(deps, {
      projectId: fx.projectA,
      role: 'practitioner',
      policy: {
        ...DEFAULT_POLICIES.practitioner,
        rules: [
          ...DEFAULT_POLICIES.practitioner.rules,
          { effect: 'allow', types: ['AuditEvent'], interactions: 'rs' },
        ],
      },
    });
    try {
      await assert.rejects(
        fx.gateway().session(doc(), facts('ETREAT', 'emergency')).auditReader('s'),
        (e: { code?: string }) => e.code === 'PURPOSE_NOT_ALLOWED',
      );
    } finally {
      await setPolicy(deps, {
        projectId: fx.projectA,
        role: 'practitioner',
        policy: DEFAULT_POLICIES.practitioner,
      });
    }
    await assert.rejects(
      s().create('AuditEvent', { resourceType: 'AuditEvent' }),
      (e: { code?: string }) => e.code === 'AUDIT_EVENT_READ_ONLY',
      'AuditEvent is never written through the resource store',
    );
    const app = userPrincipal(fx.projectA, {
      role: 'practitioner',
      fhirUser: 'Practitioner/doc',
      launchPatient: 'gp',
      scopes: 'patient/*.rs',
    });
    assert.equal(
      await statusOf(() => gw.session(app, facts('ETREAT', 'emergency')).read('Patient', 'other')),
      404,
    );
  });

  test('an administrator reviews an alert once (audited)', async () => {
    const [alert] = await listBreakGlass(
      { db: fx.core.resourceDb },
      { projectId: fx.projectA, pending: true },
    );
    const deps = { db: fx.core.resourceDb, audit: fx.core.audit };
    const done = await reviewBreakGlass(deps, { id: alert!.id, outcome: 'justified', reviewedBy: 'dana' });
    assert.equal(done.outcome, 'justified');
    await assert.rejects(
      reviewBreakGlass(deps, { id: alert!.id, outcome: 'justified' }),
      (e: { code?: string }) => e.code === 'BREAK_GLASS_REVIEWED',
    );
  });
});

describe('policies: versioned, validated, enforced', () => {
  test('set, list, show: each change a new version; the gateway enforces the newest', async () => {
    const deps = { db: fx.core.resourceDb, audit: fx.core.audit, isResourceType };
    const list = await listPolicies(deps, fx.projectA);
    assert.deepEqual(list.find((p) => p.role === 'practitioner')!.policy, DEFAULT_POLICIES.practitioner);
    const earlier = (await showPolicy(deps, fx.projectA, 'practitioner')).history.length;
    const v1 = await setPolicy(deps, {
      projectId: fx.projectA,
      role: 'practitioner',
      policy: {
        ...DEFAULT_POLICIES.practitioner,
        rules: [
          ...DEFAULT_POLICIES.practitioner.rules,
          {
            effect: 'deny',
            types: ['Observation'],
            interactions: 'cruds',
            criteria: `category=${CAT}|imaging`,
          },
        ],
      },
    });
    const v2 = await setPolicy(deps, { projectId: fx.projectA, role: 'practitioner', policy: v1.policy });
    assert.equal(v2.version, v1.version + 1);
    const shown = await showPolicy(deps, fx.projectA, 'practitioner');
    assert.equal(shown.version, v2.version);
    assert.equal(shown.history.length, earlier + 2);
    assert.deepEqual(
      shown.history.slice(0, 2).map((h) => h.version),
      [v2.version, v1.version],
    );
    const fresh = fx.gateway(); // a running server picks the change up within POLICY_CACHE_MS
    const r = await fresh.session(doc(), facts('TREAT')).search(BASE, {
      type: 'Observation',
      query: new URLSearchParams('_total=accurate'),
      strict: false,
      path: '/Observation',
    });
    assert.equal(JSON.parse(r.body!).total, 6, 'the imaging Observations are denied');
    await setPolicy(deps, {
      projectId: fx.projectA,
      role: 'practitioner',
      policy: DEFAULT_POLICIES.practitioner,
    });
  });

  test('invalid policies are refused with the rule and the reason', () => {
    const bad = (p: unknown) =>
      assert.throws(
        () => validatePolicy(p, isResourceType),
        (e: { code?: string }) => e.code === 'POLICY_INVALID',
      );
    bad({ rules: [], purposes: ['TREAT'] });
    bad({
      rules: [{ effect: 'maybe', types: ['Patient'], interactions: 'r' }],
      purposes: [],
      breakGlass: false,
    });
    bad({
      rules: [{ effect: 'allow', types: ['Nope'], interactions: 'r' }],
      purposes: [],
      breakGlass: false,
    });
    bad({
      rules: [{ effect: 'allow', types: ['Patient'], interactions: 'rc' }],
      purposes: [],
      breakGlass: false,
    });
    bad({ rules: [], purposes: ['ETREAT'], breakGlass: false });
    bad({
      rules: [{ effect: 'allow', types: ['Patient'], interactions: 'r', criteria: 'name=x' }],
      purposes: [],
      breakGlass: false,
    });
    bad({
      rules: [{ effect: 'allow', types: ['*'], interactions: 'r', criteria: 'status=final' }],
      purposes: [],
      breakGlass: false,
    });
    for (const p of Object.values(DEFAULT_POLICIES)) validatePolicy(p, isResourceType);
  });

  test('role masks narrow what the purpose reveals (minimum necessary)', async () => {
    const deps = { db: fx.core.resourceDb, audit: fx.core.audit, isResourceType };
    await setPolicy(deps, {
      projectId: fx.projectA,
      role: 'practitioner',
      policy: { ...DEFAULT_POLICIES.practitioner, visibleClasses: [] },
    });
    await gw.session(systemPrincipal(fx.projectA), facts('TREAT')).update(
      'Patient',
      'gp',
      labelled({
        resourceType: 'Patient',
        id: 'gp',
        // A national identifier: the class 'identifiers' protects it (protection-policy.ts).
        identifier: [{ system: 'http://hl7.org/fhir/sid/us-ssn', value: '999-01-4321' }],
        generalPractitioner: [{ reference: 'Practitioner/doc' }],
      }),
    );
    assert.ok(fx.core.encryption, 'field-level encryption is on in tests');
    const masked = await fx.gateway().session(doc(), facts('TREAT')).read('Patient', 'gp');
    assert.ok(!masked.version!.json!.includes('999-01-4321'), 'TREAT would reveal it; the role does not');
    assert.match(masked.version!.json!, /"MASKED"/);
    await setPolicy(deps, {
      projectId: fx.projectA,
      role: 'practitioner',
      policy: DEFAULT_POLICIES.practitioner,
    });
    const open = await fx.gateway().session(doc(), facts('TREAT')).read('Patient', 'gp');
    assert.ok(open.version!.json!.includes('999-01-4321'));
  });
});

describe('SMART v2 granular scopes', () => {
  test('the query is kept, never read as an unrestricted scope', () => {
    const s = parseSmartScope('patient/Observation.rs?category=laboratory')!;
    assert.equal(s.query, 'category=laboratory');
    assert.equal(allows([s], 'Observation', 'r', 'patient'), false);
    assert.equal(parseSmartScope('patient/*.rs?category=laboratory'), null);
    assert.equal(parseSmartScope('patient/Observation.read?category=laboratory'), null);
    assert.ok(covers([parseSmartScope('patient/Observation.rs')!], s));
    assert.ok(!covers([parseSmartScope('patient/Observation.rs?category=vital-signs')!], s));
  });
});

describe('the SQL and the in-memory evaluation of a predicate agree', () => {
  test('on every resource of the project, for generated predicates (fast-check)', async () => {
    const rows = (
      await fx.core.resourceDb.query<{ resource_type: string; id: string; json: string; patients: string[] }>(
        'SELECT resource_type, id, content::text AS json, patients FROM resource WHERE project_id = $1 AND NOT deleted',
        [fx.projectA],
      )
    ).rows;
    assert.ok(rows.length > 15);
    const leaves: AccessPredicate[] = [
      { op: 'patients', ids: ['gp'] },
      { op: 'patients', ids: ['team', 'other'] },
      { op: 'patients', ids: [] },
      criteriaPredicate('Observation', `category=${CAT}|laboratory`, BASE),
      criteriaPredicate('Observation', 'category=vital-signs,imaging', BASE),
      criteriaPredicate('Observation', 'status:not=cancelled', BASE),
      criteriaPredicate('Observation', 'subject=Patient/gp', BASE),
      criteriaPredicate('Patient', 'general-practitioner=Practitioner/doc', BASE),
      criteriaPredicate('CareTeam', 'participant=Practitioner/doc', BASE),
      { op: 'true' },
      { op: 'false' },
    ];
    const pred: fc.Arbitrary<AccessPredicate> = fc.letrec<{ p: AccessPredicate }>((tie) => ({
      p: fc.oneof(
        { depthSize: 'small', withCrossShrink: true },
        fc.constantFrom(...leaves),
        fc.array(tie('p'), { minLength: 1, maxLength: 3 }).map((of) => and(...of)),
        fc.array(tie('p'), { minLength: 1, maxLength: 3 }).map((of) => or(...of)),
        tie('p').map(not),
      ),
    })).p;
    await fc.assert(
      fc.asyncProperty(pred, async (p) => {
        const params: unknown[] = [fx.projectA];
        const sql = predicateSql(p, 'r', (v) => `$${params.push(v)}`);
        const hit = await fx.core.resourceDb.query<{ k: string }>(
          `SELECT r.resource_type || '/' || r.id AS k FROM resource r WHERE r.project_id = $1 AND NOT r.deleted AND ${sql}`,
          params,
        );
        const inSql = new Set(hit.rows.map((x) => x.k));
        for (const row of rows) {
          const keys = new Set(
            extractSearchIndex(JSON.parse(row.json) as Record<string, unknown>, BASE).keys,
          );
          const inMemory = evaluate(p, { patients: row.patients, keys: () => keys });
          assert.equal(
            inSql.has(`${row.resource_type}/${row.id}`),
            inMemory,
            `${row.resource_type}/${row.id}`,
          );
        }
      }),
      { numRuns: 150 },
    );
  });
});

describe('search (the predicate in SQL) and read (the same predicate in memory) agree', () => {
  // Through the gateway, on the same data, for several policies and principals: the set a search
  // returns is exactly the set of resources a read of each one returns. Each case must narrow (some
  // but not all of a type), or it would not tell the two evaluations apart.
  const rules = DEFAULT_POLICIES.practitioner.rules;
  const patientRules = DEFAULT_POLICIES.patient.rules;
  const cases: { name: string; role: 'practitioner' | 'patient'; policy: unknown; who: () => Principal }[] = [
    { name: 'default practitioner policy (care team)', role: 'practitioner', policy: undefined, who: doc },
    {
      name: 'care team, imaging denied',
      role: 'practitioner',
      policy: {
        ...DEFAULT_POLICIES.practitioner,
        rules: [
          ...rules,
          { effect: 'deny', types: ['Observation'], interactions: 'rs', criteria: 'category=imaging' },
        ],
      },
      who: doc,
    },
    {
      name: 'every Patient, but only non-cancelled laboratory Observations of the care team',
      role: 'practitioner',
      policy: {
        ...DEFAULT_POLICIES.practitioner,
        rules: [
          { effect: 'allow', types: ['Patient'], interactions: 'rs' },
          {
            effect: 'allow',
            types: ['Observation'],
            interactions: 'rs',
            compartment: 'care-team',
            criteria: `category=${CAT}|laboratory&status:not=cancelled`,
          },
          { effect: 'allow', types: ['CareTeam'], interactions: 'rs', compartment: 'care-team' },
        ],
      },
      who: doc,
    },
    {
      name: 'care team with a granular scope (user/Observation.rs?category=vital-signs,imaging)',
      role: 'practitioner',
      policy: undefined,
      who: () =>
        userPrincipal(fx.projectA, {
          role: 'practitioner',
          fhirUser: 'Practitioner/doc',
          scopes: 'user/Patient.rs user/CareTeam.rs user/Observation.rs?category=vital-signs,imaging',
        }),
    },
    {
      name: 'patient: own compartment, vital signs denied',
      role: 'patient',
      policy: {
        ...DEFAULT_POLICIES.patient,
        rules: [
          ...patientRules,
          { effect: 'deny', types: ['Observation'], interactions: 'rs', criteria: 'category=vital-signs' },
        ],
      },
      who: () =>
        userPrincipal(fx.projectA, { role: 'patient', fhirUser: 'Patient/team', scopes: 'user/*.rs' }),
    },
    {
      name: 'patient with patient/ scopes (launch context)',
      role: 'patient',
      policy: undefined,
      who: () =>
        userPrincipal(fx.projectA, { role: 'patient', fhirUser: 'Patient/gp', scopes: 'patient/*.rs' }),
    },
  ];

  for (const c of cases)
    test(c.name, async () => {
      const deps = { db: fx.core.resourceDb, audit: fx.core.audit, isResourceType };
      const purpose = c.role === 'patient' ? 'PATRQT' : 'TREAT';
      await setPolicy(deps, {
        projectId: fx.projectA,
        role: c.role,
        policy: c.policy ?? DEFAULT_POLICIES[c.role],
      });
      try {
        const g = fx.gateway();
        const all = (
          await fx.core.resourceDb.query<{ resource_type: string; id: string }>(
            `SELECT resource_type, id FROM resource WHERE project_id = $1 AND NOT deleted
              AND resource_type IN ('Patient', 'Observation', 'CareTeam')`,
            [fx.projectA],
          )
        ).rows;
        let narrowed = false;
        for (const type of ['Patient', 'Observation', 'CareTeam']) {
          const ids = all.filter((r) => r.resource_type === type).map((r) => r.id);
          const byRead: string[] = [];
          for (const id of ids) {
            const st = await statusOf(() => g.session(c.who(), facts(purpose)).read(type, id));
            assert.ok(st === 200 || st === 403 || st === 404, `read ${type}/${id}: ${st}`);
            if (st === 200) byRead.push(id);
          }
          let bySearch: string[] = [];
          let total = 0;
          try {
            const r = await g.session(c.who(), facts(purpose)).search(BASE, {
              type,
              query: new URLSearchParams('_total=accurate&_count=1000'),
              strict: false,
              path: `/${type}`,
            });
            const b = JSON.parse(r.body!) as { total: number; entry?: { resource: { id: string } }[] };
            bySearch = (b.entry ?? []).map((e) => e.resource.id);
            total = b.total;
          } catch (e) {
            assert.ok(['FORBIDDEN_POLICY', 'FORBIDDEN_SCOPE'].includes((e as { code?: string }).code ?? ''));
          }
          assert.deepEqual(bySearch.sort(), byRead.sort(), `${type}: search and read agree`);
          assert.equal(total, bySearch.length, `${type}: _total counts what may be seen`);
          if (byRead.length > 0 && byRead.length < ids.length) narrowed = true;
        }
        assert.ok(narrowed, 'the case narrows some type to some but not all of its resources');
      } finally {
        await setPolicy(deps, { projectId: fx.projectA, role: c.role, policy: DEFAULT_POLICIES[c.role] });
      }
    });
});
