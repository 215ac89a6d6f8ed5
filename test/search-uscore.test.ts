import { after, before, describe, test } from 'node:test';
import assert from 'node:assert/strict';
import fs from 'node:fs';
import path from 'node:path';
import { startHarness, type Harness } from './support/harness.ts';
import { labelled, SYNTHEA_DIR } from './support/synthea.ts';
import { parseSearch } from '../src/fhir/search-request.ts';
import { explainSearch } from '../src/store/search-sql.ts';

// US Core's required search combinations on real Synthea patients. The expected results are
// computed here from the source bundles with plain JavaScript (an oracle independent of the
// index), and every search must return exactly them.
const dir = SYNTHEA_DIR;
const FILES = [
  'Buster_Hoeger_ad2e3fc5-2b5d-4cb9-8d03-9ea0f4ac8423.json',
  'Chet_Hoeger_5c6db3d0-c0fc-4eb7-8eae-dbc7847be741.json',
  'Ned_Hintz_e4b9259d-0f54-48d1-a35d-b526729a4dfe.json',
  'Gustavo_Mejía_59a8543c-e24f-4a01-b28b-47ccde6bc11d.json',
];
const present = FILES.every((f) => fs.existsSync(path.join(dir, f)));

type R = Record<string, any>;
let h: Harness;
/** Every loaded resource with its server id. */
const loaded: { resource: R; id: string }[] = [];

before(async () => {
  if (!present) return;
  h = await startHarness();
  for (const f of FILES) {
    const bundle = labelled(JSON.parse(fs.readFileSync(path.join(dir, f), 'utf8')) as { entry: any[] });
    const res = await h.fhir('', { method: 'POST', body: JSON.stringify(bundle) });
    assert.equal(res.status, 200, f);
    const out = (await res.json()) as R;
    out.entry.forEach((e: R, i: number) => {
      const id = /^[A-Za-z]+\/([^/]+)/.exec(e.response.location)![1]!;
      loaded.push({ resource: bundle.entry[i].resource, id });
    });
  }
});
after(async () => {
  await h?.close();
});

const of = (type: string) => loaded.filter((x) => x.resource.resourceType === type);
const patients = () => of('Patient');
/** The server id of the patient a resource's subject/patient points at (urn:uuid in the source). */
function subjectOf(r: R): string | undefined {
  const ref: string | undefined = (r.subject ?? r.patient)?.reference;
  const src = ref?.replace('urn:uuid:', '');
  return loaded.find((x) => x.resource.resourceType === 'Patient' && x.resource.id === src)?.id;
}
const codes = (cc: R | R[] | undefined): string[] =>
  (Array.isArray(cc) ? cc : cc ? [cc] : []).flatMap((c: R) =>
    (c.coding ?? []).map((x: R) => `${x.system}|${x.code}`),
  );
const fold = (s: string) => s.normalize('NFKD').replace(/\p{M}/gu, '').toLowerCase();
const instant = (r: R): number => Date.parse(r.effectiveDateTime ?? r.effectivePeriod?.start ?? r.issued);

async function ids(query: string): Promise<string[]> {
  const res = await h.fhir(`${query}${query.includes('?') ? '&' : '?'}_count=1000`);
  const body = (await res.json()) as R;
  assert.equal(res.status, 200, `${query}: ${JSON.stringify(body).slice(0, 300)}`);
  assert.equal(body.type, 'searchset');
  return (body.entry ?? [])
    .filter((e: R) => e.search.mode === 'match')
    .map((e: R) => e.resource.id)
    .sort();
}
const expect = (xs: { id: string }[]) => xs.map((x) => x.id).sort();

describe(
  'US Core search combinations on Synthea patients',
  { skip: present ? false : 'shared/data/synthea-r4 absent' },
  () => {
    test('Patient: identifier, name, birthdate+name, gender+name', async () => {
      for (const p of patients()) {
        const ident = p.resource.identifier.find(
          (i: R) => i.system === 'https://github.com/synthetichealth/synthea',
        );
        assert.deepEqual(
          await ids(`/Patient?identifier=${encodeURIComponent(`${ident.system}|${ident.value}`)}`),
          [p.id],
        );
        const family: string = p.resource.name[0].family;
        const byName = patients().filter((q) =>
          q.resource.name.some((n: R) =>
            [n.family, ...(n.given ?? []), ...(n.prefix ?? []), ...(n.suffix ?? [])].some((s: string) =>
              fold(s).startsWith(fold(family)),
            ),
          ),
        );
        assert.ok(byName.length >= 1);
        assert.deepEqual(await ids(`/Patient?name=${encodeURIComponent(family)}`), expect(byName));
        assert.deepEqual(
          await ids(`/Patient?birthdate=${p.resource.birthDate}&name=${encodeURIComponent(family)}`),
          expect(byName.filter((q) => q.resource.birthDate === p.resource.birthDate)),
        );
        assert.deepEqual(
          await ids(`/Patient?gender=${p.resource.gender}&name=${encodeURIComponent(family)}`),
          expect(byName.filter((q) => q.resource.gender === p.resource.gender)),
        );
      }
      // Two Hoegers: a name search returns both, and only them.
      assert.equal((await ids('/Patient?name=hoeger')).length, 2);
      // Accents fold: Mejía is found as "mejia".
      assert.equal((await ids('/Patient?family=mejia')).length, 1);
    });

    test('Observation: patient+category(+date), patient+code(+date)', async () => {
      const CAT = 'http://terminology.hl7.org/CodeSystem/observation-category';
      for (const p of patients()) {
        const mine = of('Observation').filter((o) => subjectOf(o.resource) === p.id);
        for (const cat of ['vital-signs', 'laboratory', 'survey']) {
          const inCat = mine.filter((o) => codes(o.resource.category).includes(`${CAT}|${cat}`));
          assert.deepEqual(await ids(`/Observation?patient=${p.id}&category=${cat}`), expect(inCat), cat);
          assert.deepEqual(
            await ids(`/Observation?patient=${p.id}&category=${CAT}|${cat}&date=ge2015-01-01`),
            expect(inCat.filter((o) => instant(o.resource) >= Date.parse('2015-01-01T00:00:00Z'))),
          );
        }
        const code = codes(mine[0]!.resource.code)[0]!;
        const withCode = mine.filter((o) => codes(o.resource.code).includes(code));
        assert.deepEqual(
          await ids(`/Observation?patient=${p.id}&code=${encodeURIComponent(code)}`),
          expect(withCode),
        );
        const year = new Date(instant(withCode[0]!.resource)).getUTCFullYear();
        assert.deepEqual(
          await ids(`/Observation?patient=${p.id}&code=${encodeURIComponent(code)}&date=${year}`),
          expect(withCode.filter((o) => new Date(instant(o.resource)).getUTCFullYear() === year)),
        );
      }
    });

    test('Condition, Encounter, MedicationRequest, DiagnosticReport by patient and required combinations', async () => {
      for (const p of patients()) {
        const mine = (t: string) => of(t).filter((x) => subjectOf(x.resource) === p.id);
        assert.deepEqual(await ids(`/Condition?patient=${p.id}`), expect(mine('Condition')));
        assert.deepEqual(
          await ids(`/Condition?patient=${p.id}&clinical-status=active`),
          expect(
            mine('Condition').filter((c) =>
              codes(c.resource.clinicalStatus).some((x) => x.endsWith('|active')),
            ),
          ),
        );
        assert.deepEqual(await ids(`/Encounter?patient=${p.id}`), expect(mine('Encounter')));
        assert.deepEqual(
          await ids(`/Encounter?patient=${p.id}&date=ge2010`),
          expect(
            mine('Encounter').filter(
              (e) =>
                Date.parse(e.resource.period.end ?? '9999') >= Date.parse('2011-01-01T00:00:00Z') ||
                Date.parse(e.resource.period.start) >= Date.parse('2010-01-01T00:00:00Z'),
            ),
          ),
        );
        assert.deepEqual(await ids(`/MedicationRequest?patient=${p.id}`), expect(mine('MedicationRequest')));
        assert.deepEqual(
          await ids(`/MedicationRequest?patient=${p.id}&intent=order`),
          expect(mine('MedicationRequest').filter((m) => m.resource.intent === 'order')),
        );
        assert.deepEqual(
          await ids(`/MedicationRequest?patient=${p.id}&intent=order&status=active`),
          expect(
            mine('MedicationRequest').filter(
              (m) => m.resource.intent === 'order' && m.resource.status === 'active',
            ),
          ),
        );
        assert.deepEqual(await ids(`/DiagnosticReport?patient=${p.id}`), expect(mine('DiagnosticReport')));
        const reportCode = codes(mine('DiagnosticReport')[0]!.resource.code)[0]!;
        assert.deepEqual(
          await ids(`/DiagnosticReport?patient=${p.id}&code=${encodeURIComponent(reportCode)}`),
          expect(mine('DiagnosticReport').filter((d) => codes(d.resource.code).includes(reportCode))),
        );
      }
    });

    test('each US Core combination can be served by indexes (EXPLAIN with sequential scans priced out)', async () => {
      const p = patients()[0]!;
      const queries: [string, string][] = [
        ['Patient', `identifier=https://github.com/synthetichealth/synthea|${p.resource.id}`],
        ['Patient', 'name=hoeger'],
        ['Patient', `birthdate=${p.resource.birthDate}&name=hoeger`],
        ['Patient', 'gender=male&name=hoeger'],
        ['Observation', `patient=${p.id}&category=laboratory`],
        ['Observation', `patient=${p.id}&category=laboratory&date=ge2015`],
        ['Observation', `patient=${p.id}&code=http://loinc.org|8302-2`],
        ['Observation', `patient=${p.id}&code=http://loinc.org|8302-2&date=ge2015`],
        ['Condition', `patient=${p.id}`],
        ['Encounter', `patient=${p.id}`],
        ['MedicationRequest', `patient=${p.id}&intent=order`],
        ['DiagnosticReport', `patient=${p.id}`],
      ];
      const db = h.server.core.resourceDb;
      for (const [type, qs] of queries) {
        const req = parseSearch([type], new URLSearchParams(qs), { strict: true });
        const plan = await db.transaction(async (q) => {
          // On a small table a scan is cheapest; pricing it out shows whether an index can serve the query.
          await q.query('SET LOCAL enable_seqscan = off');
          return explainSearch(q, req, {
            projectId: h.init.projectId,
            canRead: () => true,
            baseUrl: h.base,
          });
        });
        assert.doesNotMatch(plan, /Seq Scan on (resource|search_)/, `${type}?${qs}\n${plan}`);
        assert.match(plan, /Index|Bitmap/, `${type}?${qs}`);
      }
    });
  },
);
