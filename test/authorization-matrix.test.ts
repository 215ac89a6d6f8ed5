import { after, before, describe, test } from 'node:test';
import assert from 'node:assert/strict';
import type { PhiGateway, Principal } from '../src/phi/gateway.ts';
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

// The authorization matrix (issue 6): every FHIR interaction, each role, with and without the right
// scope and purpose, across two projects (the same ids in both) and two patients' compartments.
// Each cell is an exact allow or deny; no response ever carries the other project's data.

const MARK_B = 'Zzprojectb';
const LAB = { system: 'http://terminology.hl7.org/CodeSystem/observation-category', code: 'laboratory' };
const VS = { system: 'http://terminology.hl7.org/CodeSystem/observation-category', code: 'vital-signs' };

function observation(patient: string, category: typeof LAB, extra: Record<string, unknown> = {}) {
  return labelled({
    resourceType: 'Observation',
    status: 'final',
    category: [{ coding: [category] }],
    code: { coding: [{ system: 'http://loinc.org', code: '2345-7' }] },
    subject: { reference: `Patient/${patient}` },
    ...extra,
  });
}

/** The data of each project: same ids, distinguishable content. */
function dataset(mark: string): [string, string, Record<string, unknown>][] {
  return [
    ['Practitioner', 'pr-a', labelled({ resourceType: 'Practitioner', name: [{ family: `Doc${mark}` }] })],
    ['Practitioner', 'pr-b', labelled({ resourceType: 'Practitioner', name: [{ family: `Other${mark}` }] })],
    ['Organization', 'org-1', labelled({ resourceType: 'Organization', name: `Clinic${mark}` })],
    [
      'Patient',
      'p1',
      labelled({
        resourceType: 'Patient',
        name: [{ family: `One${mark}` }],
        gender: 'other',
        generalPractitioner: [{ reference: 'Practitioner/pr-a' }],
      }),
    ],
    [
      'Patient',
      'p2',
      labelled({ resourceType: 'Patient', name: [{ family: `Two${mark}` }], gender: 'other' }),
    ],
    ['Observation', 'o1-lab', observation('p1', LAB, { id: 'o1-lab' })],
    ['Observation', 'o1-vs', observation('p1', VS, { id: 'o1-vs' })],
    ['Observation', 'o2-lab', observation('p2', LAB, { id: 'o2-lab' })],
  ];
}

const ALL = [
  'Practitioner/pr-a',
  'Practitioner/pr-b',
  'Organization/org-1',
  'Patient/p1',
  'Patient/p2',
].concat(['o1-lab', 'o1-vs', 'o2-lab'].map((id) => `Observation/${id}`));
const DIRECTORY = ['Practitioner/pr-a', 'Practitioner/pr-b', 'Organization/org-1'];
const P1 = ['Patient/p1', 'Observation/o1-lab', 'Observation/o1-vs'];

interface Row {
  name: string;
  principal: (project: string) => Principal;
  purpose: string;
  /** What it may read (and search). */
  reads: string[];
  /** Patients for whose compartment it may create and update an Observation. */
  writes: string[];
  /** Patients in whose compartment it may delete an Observation. */
  deletes: string[];
}

const ROWS: Row[] = [
  {
    name: 'system client, system/*.cruds',
    principal: (p) => systemPrincipal(p),
    purpose: 'TREAT',
    reads: ALL,
    writes: ['p1', 'p2'],
    deletes: ['p1', 'p2'],
  },
  {
    name: 'system client without an Observation scope',
    principal: (p) => systemPrincipal(p, 'system/Patient.rs'),
    purpose: 'TREAT',
    reads: ['Patient/p1', 'Patient/p2'],
    writes: [],
    deletes: [],
  },
  {
    name: 'system client, purpose not registered',
    principal: (p) => systemPrincipal(p, 'system/*.cruds', ['HOPERAT']),
    purpose: 'TREAT',
    reads: [],
    writes: [],
    deletes: [],
  },
  {
    name: 'practitioner of p1 (user/*.cruds, TREAT)',
    principal: (p) =>
      userPrincipal(p, { role: 'practitioner', fhirUser: 'Practitioner/pr-a', scopes: 'user/*.cruds' }),
    purpose: 'TREAT',
    reads: [...DIRECTORY, ...P1],
    writes: ['p1'],
    deletes: ['p1'],
  },
  {
    name: 'practitioner, purpose the role may not claim (HPAYMT)',
    principal: (p) =>
      userPrincipal(p, { role: 'practitioner', fhirUser: 'Practitioner/pr-a', scopes: 'user/*.cruds' }),
    purpose: 'HPAYMT',
    reads: [],
    writes: [],
    deletes: [],
  },
  {
    name: 'practitioner without scopes for Observation',
    principal: (p) =>
      userPrincipal(p, { role: 'practitioner', fhirUser: 'Practitioner/pr-a', scopes: 'user/Patient.rs' }),
    purpose: 'TREAT',
    reads: ['Patient/p1'],
    writes: [],
    deletes: [],
  },
  {
    name: 'practitioner of p1 in a patient-context app launched for p2',
    principal: (p) =>
      userPrincipal(p, {
        role: 'practitioner',
        fhirUser: 'Practitioner/pr-a',
        launchPatient: 'p2',
        scopes: 'patient/*.cruds',
      }),
    purpose: 'TREAT',
    reads: [],
    writes: [],
    deletes: [],
  },
  {
    name: 'practitioner of p1 in a patient-context app launched for p1',
    principal: (p) =>
      userPrincipal(p, {
        role: 'practitioner',
        fhirUser: 'Practitioner/pr-a',
        launchPatient: 'p1',
        scopes: 'patient/*.cruds',
      }),
    purpose: 'TREAT',
    reads: P1,
    writes: ['p1'],
    deletes: ['p1'],
  },
  {
    name: 'patient p1 (patient/*.cruds, PATRQT)',
    principal: (p) =>
      userPrincipal(p, { role: 'patient', fhirUser: 'Patient/p1', scopes: 'patient/*.cruds' }),
    purpose: 'PATRQT',
    // patient/ scopes confine to the compartment: directory resources are outside it.
    reads: P1,
    writes: ['p1'],
    deletes: [],
  },
  {
    name: 'patient p1 with user/ scopes (the role policy alone confines)',
    principal: (p) => userPrincipal(p, { role: 'patient', fhirUser: 'Patient/p1', scopes: 'user/*.cruds' }),
    purpose: 'PATRQT',
    reads: [...DIRECTORY, ...P1],
    writes: ['p1'],
    deletes: [],
  },
  {
    name: 'patient p1, granular scope patient/Observation.rs?category=laboratory',
    principal: (p) =>
      userPrincipal(p, {
        role: 'patient',
        fhirUser: 'Patient/p1',
        scopes: `patient/Patient.rs patient/Observation.rs?category=${LAB.system}|laboratory`,
      }),
    purpose: 'PATRQT',
    reads: ['Patient/p1', 'Observation/o1-lab'],
    writes: [],
    deletes: [],
  },
  {
    name: 'patient p1 claiming TREAT',
    principal: (p) =>
      userPrincipal(p, { role: 'patient', fhirUser: 'Patient/p1', scopes: 'patient/*.cruds' }),
    purpose: 'TREAT',
    reads: [],
    writes: [],
    deletes: [],
  },
  {
    name: 'administrator (user/*.cruds, HOPERAT)',
    principal: (p) => userPrincipal(p, { role: 'admin', scopes: 'user/*.cruds' }),
    purpose: 'HOPERAT',
    reads: DIRECTORY,
    writes: [],
    deletes: [],
  },
  {
    name: 'auditor (user/*.rs, HCOMPL)',
    principal: (p) => userPrincipal(p, { role: 'auditor', scopes: 'user/*.rs' }),
    purpose: 'HCOMPL',
    reads: [],
    writes: [],
    deletes: [],
  },
];

let fx: AccessFixture;
let gw: PhiGateway;
/** Every body a project-A principal was given. */
const bodiesA: string[] = [];

before(async () => {
  fx = await openAccessFixture();
  gw = fx.gateway();
  for (const [project, mark] of [
    [fx.projectA, ''],
    [fx.projectB, MARK_B],
  ] as const) {
    const sys = gw.session(systemPrincipal(project), facts('TREAT'));
    for (const [type, id, body] of dataset(mark)) {
      const r = await sys.update(type, id, { ...body, id });
      assert.ok(r.status === 201 || r.status === 200, `seed ${type}/${id}`);
    }
  }
});
after(async () => {
  await fx?.close();
});

const session = (row: Row, project?: string) =>
  gw.session(row.principal(project ?? fx.projectA), facts(row.purpose));

const keep = <T extends { status: number; body?: string; version?: { json?: string } }>(r: T): T => {
  bodiesA.push(r.body ?? r.version?.json ?? '');
  return r;
};

function idsOf(body: string, mode = 'match'): string[] {
  const b = JSON.parse(body) as {
    entry?: { resource?: { resourceType: string; id: string }; search?: { mode: string } }[];
  };
  return (b.entry ?? [])
    .filter((e) => e.search?.mode === mode && e.resource)
    .map((e) => `${e.resource!.resourceType}/${e.resource!.id}`)
    .sort();
}

for (const row of ROWS) {
  describe(`matrix: ${row.name}`, () => {
    for (const ref of ALL) {
      const [type, id] = ref.split('/') as [string, string];
      const allowed = row.reads.includes(ref);
      test(`read, vread, history, transaction GET of ${ref}: ${allowed ? 'allow' : 'deny'}`, async () => {
        const read = await statusOf(async () => keep(await session(row).read(type, id)));
        const vread = await statusOf(async () => keep(await session(row).vread(type, id, '1')));
        const getEntry = await statusOf(async () => {
          const r = keep(
            await session(row).transaction(BASE, {
              resourceType: 'Bundle',
              type: 'transaction',
              entry: [{ request: { method: 'GET', url: `${type}/${id}` } }],
            }),
          );
          return { status: Number(/"status":"(\d+)/.exec(r.body!)![1]) };
        });
        let history: 'allow' | 'deny';
        try {
          const h = keep(await session(row).history(BASE, { type, id }));
          history = JSON.parse(h.body!).entry.length > 0 ? 'allow' : 'deny';
        } catch {
          history = 'deny';
        }
        const expected = allowed ? 200 : 'deny';
        for (const [what, got] of [
          ['read', read],
          ['vread', vread],
          ['transaction GET', getEntry],
        ] as const) {
          if (allowed) assert.equal(got, 200, `${what} ${ref}`);
          else
            assert.ok(got === 403 || got === 404, `${what} ${ref} denied (got ${got}, expected ${expected})`);
        }
        assert.equal(history, allowed ? 'allow' : 'deny', `history ${ref}`);
      });
    }

    for (const type of ['Patient', 'Observation', 'Practitioner']) {
      const expected = row.reads.filter((r) => r.startsWith(`${type}/`)).sort();
      test(`search ${type}: exactly ${expected.length ? expected.join(', ') : 'nothing'}, total and paging right`, async () => {
        const run = async (query: string) => {
          try {
            return keep(
              await session(row).search(BASE, {
                type,
                query: new URLSearchParams(query),
                strict: false,
                path: `/${type}`,
              }),
            ).body!;
          } catch {
            return undefined;
          }
        };
        // Only the seeded resources: the write cells below add more to the compartments.
        const seeded = `_id=${ALL.filter((r) => r.startsWith(`${type}/`))
          .map((r) => r.split('/')[1])
          .join(',')}`;
        const body = await run(`${seeded}&_total=accurate&_count=100`);
        if (!body) {
          assert.equal(
            expected.length,
            0,
            'a refused search must be a row that may read nothing of the type',
          );
          return;
        }
        assert.deepEqual(idsOf(body), expected);
        assert.equal(JSON.parse(body).total, expected.length, '_total counts only what may be seen');
        // Paging one at a time walks exactly the same set.
        const walked: string[] = [];
        let query = `${seeded}&_count=1`;
        for (let i = 0; i < 20; i++) {
          const page = await run(query);
          if (!page) break;
          walked.push(...idsOf(page));
          const next = (JSON.parse(page).link as { relation: string; url: string }[]).find(
            (l) => l.relation === 'next',
          );
          if (!next) break;
          query = new URL(next.url).search.slice(1);
        }
        assert.deepEqual(walked.sort(), expected);
      });
    }

    test('includes, revincludes, _has, chains and compartment search show nothing beyond the row', async () => {
      const search = async (type: string, query: string, patient?: string) => {
        try {
          return keep(
            await session(row).search(BASE, {
              type,
              patient,
              query: new URLSearchParams(query),
              strict: false,
              path: `/${type}`,
            }),
          ).body!;
        } catch {
          return undefined;
        }
      };
      const seen = new Set<string>();
      for (const [type, q, patient] of [
        ['Observation', '_include=Observation:subject'],
        ['Patient', '_revinclude=Observation:subject'],
        ['Patient', '_has:Observation:subject:category=laboratory'],
        ['Observation', 'subject:Patient.gender=other'],
        ['Observation', '', 'p2'],
        ['Observation', '', 'p1'],
      ] as [string, string, string?][]) {
        const body = await search(type, q, patient);
        if (body) for (const r of [...idsOf(body), ...idsOf(body, 'include')]) seen.add(r);
      }
      const canObservation = row.reads.some((r) => r.startsWith('Observation/'));
      for (const r of seen) {
        if (ALL.includes(r)) assert.ok(row.reads.includes(r), `${r} must not be reachable`);
        else {
          // Made by the write cells: reachable only through a readable patient's compartment.
          const v = await gw
            .session(systemPrincipal(fx.projectA), facts('TREAT'))
            .read(...(r.split('/') as [string, string]));
          const subject = (JSON.parse(v.version!.json!) as { subject?: { reference?: string } }).subject
            ?.reference;
          assert.ok(canObservation && row.reads.includes(subject ?? ''), `${r} must not be reachable`);
        }
      }
    });

    for (const patient of ['p1', 'p2']) {
      const mayWrite = row.writes.includes(patient);
      const mayDelete = row.deletes.includes(patient);
      test(`create, update, transaction POST in ${patient}'s compartment: ${mayWrite ? 'allow' : 'deny'}; delete: ${mayDelete ? 'allow' : 'deny'}`, async () => {
        const sys = () => gw.session(systemPrincipal(fx.projectA), facts('TREAT'));
        const create = await statusOf(async () =>
          keep(await session(row).create('Observation', observation(patient, LAB))),
        );
        const txn = await statusOf(async () =>
          keep(
            await session(row).transaction(BASE, {
              resourceType: 'Bundle',
              type: 'transaction',
              entry: [
                { resource: observation(patient, LAB), request: { method: 'POST', url: 'Observation' } },
              ],
            }),
          ),
        );
        const target = (await sys().create('Observation', observation(patient, LAB))).version!.id;
        const update = await statusOf(async () =>
          keep(
            await session(row).update(
              'Observation',
              target,
              observation(patient, LAB, { id: target, status: 'amended' }),
            ),
          ),
        );
        const del = await statusOf(async () => keep(await session(row).delete('Observation', target)));
        assert.equal(create === 201, mayWrite, `create (got ${create})`);
        assert.equal(txn === 200, mayWrite, `transaction (got ${txn})`);
        assert.equal(update === 200, mayWrite, `update (got ${update})`);
        assert.equal(del === 204, mayDelete, `delete (got ${del})`);
        for (const s of [create, txn, update, del])
          assert.ok(s < 300 || s === 403 || s === 404, `status ${s}`);
      });
    }

    if (row.writes.includes('p1'))
      test('may not move a resource out of the compartment it may write', async () => {
        const mine = (await session(row).create('Observation', observation('p1', LAB))).version!.id;
        const moved = await statusOf(() =>
          session(row).update('Observation', mine, observation('p2', LAB, { id: mine })),
        );
        if (row.writes.includes('p2')) assert.equal(moved, 200);
        else assert.equal(moved, 403);
      });
  });
}

test("project B's principals see project B's data under the same ids, never A's", async () => {
  const prac = ROWS.find((r) => r.name.startsWith('practitioner of p1 (user'))!;
  const b = await gw.session(prac.principal(fx.projectB), facts('TREAT')).read('Patient', 'p1');
  assert.ok(b.version!.json!.includes(MARK_B));
  const denied = await statusOf(() =>
    gw.session(prac.principal(fx.projectB), facts('TREAT')).read('Patient', 'p2'),
  );
  assert.equal(denied, 404);
});

test("no response to a project-A principal carries project B's data", () => {
  assert.ok(bodiesA.length > 250, `${bodiesA.length} responses checked`);
  for (const body of bodiesA)
    assert.ok(!body.includes(MARK_B), `project B data in a project A response: ${body.slice(0, 300)}`);
});
