import { after, before, test } from 'node:test';
import assert from 'node:assert/strict';
import fs from 'node:fs';
import path from 'node:path';
import { startHarness, type Harness } from './support/harness.ts';
import { labelled, SYNTHEA_DIR } from './support/synthea.ts';

// Real transaction bundles (Synthea, synthetic people) imported the way our importers do it:
// every entry labelled HTEST, since the project is a sandbox.
const dir = SYNTHEA_DIR;
const files = fs.existsSync(dir)
  ? fs
      .readdirSync(dir)
      .filter((f) => /_[0-9a-f-]{36}\.json$/.test(f))
      .sort()
      .slice(0, 2)
  : [];

type R = Record<string, any>;

let h: Harness;
before(async () => {
  if (files.length) h = await startHarness();
});
after(async () => {
  await h?.close();
});

test(
  'Synthea patient bundles import as transactions; compartments name the patient',
  { skip: files.length ? false : 'shared/data/synthea-r4 absent' },
  async () => {
    for (const f of files) {
      const bundle = labelled(JSON.parse(fs.readFileSync(path.join(dir, f), 'utf8')) as R & { entry: R[] });
      const res = await h.fhir('', { method: 'POST', body: JSON.stringify(bundle) });
      assert.equal(res.status, 200, f);
      const out = (await res.json()) as R;
      assert.equal(out.entry.length, bundle.entry.length);
      assert.ok(out.entry.every((e: R) => String(e.response.status).startsWith('201')));
      const patient = out.entry.find((e: R) => e.resource?.resourceType === 'Patient').resource;
      const obs = out.entry.find((e: R) => e.resource?.resourceType === 'Observation')?.resource;
      assert.equal(obs.subject.reference, `Patient/${patient.id}`, 'urn:uuid reference rewritten');
      const read = await h.fhir(`/Observation/${obs.id}`);
      assert.equal(read.status, 200);
      const audit = (await h.server.core.audit.read(0, 100000)).map(
        (r) => JSON.parse(r.entry.toString('utf8')) as R,
      );
      const readEvent = audit.find((e) => e.requestId === read.headers.get('x-request-id'));
      assert.deepEqual(readEvent?.patients, [patient.id], 'the read names the patient whose data it is');
      const outcome = audit.find(
        (e) => e.requestId === res.headers.get('x-request-id') && e.phase === 'outcome',
      );
      assert.deepEqual(outcome?.patients, [patient.id]);
    }
  },
);
