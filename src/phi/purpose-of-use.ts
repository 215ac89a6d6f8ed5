/**
 * HL7 v3 PurposeOfUse codes (ValueSet v3-PurposeOfUse, system v3-ActReason) that a request may
 * claim in `X-Purpose-Of-Use` or a token's `purpose_of_use` claim.
 * https://terminology.hl7.org/ValueSet-v3-PurposeOfUse.html
 */
export const PURPOSE_OF_USE_SYSTEM = 'http://terminology.hl7.org/CodeSystem/v3-ActReason';

export const PURPOSES_OF_USE: ReadonlySet<string> = new Set([
  'HMARKT',
  'HOPERAT',
  'CAREMGT',
  'DONAT',
  'FRAUD',
  'GOV',
  'HACCRED',
  'HCOMPL',
  'HDECD',
  'HDIRECT',
  'HDM',
  'HLEGAL',
  'HOUTCOMS',
  'HPRGRP',
  'HQUALIMP',
  'HSYSADMIN',
  'LABELING',
  'METAMGT',
  'MEMADMIN',
  'MILDCRG',
  'PATADMIN',
  'PATSFTY',
  'PERFMSR',
  'RECORDMGT',
  'SYSDEV',
  'HTEST',
  'TRAIN',
  'HPAYMT',
  'CLMATTCH',
  'COVAUTH',
  'COVERAGE',
  'ELIGDTRM',
  'ELIGVER',
  'ENROLLM',
  'MILDCRG',
  'REMITADV',
  'HRESCH',
  'BIORCH',
  'CLINTRCH',
  'CLINTRCHNPC',
  'CLINTRCHPC',
  'PRECLINTRCH',
  'DSRCH',
  'POARCH',
  'TRANSRCH',
  'PATRQT',
  'FAMRQT',
  'PWATRNY',
  'SUPNWK',
  'PUBHLTH',
  'DISASTER',
  'THREAT',
  'TREAT',
  'CLINTRL',
  'COC',
  'ETREAT',
  'BTG',
  'ERTREAT',
  'POPHLTH',
  'COMPT',
  'CAREMGT',
  'HSYSADMIN',
  'PUBHLTH',
]);

/** Purposes that break the glass: reserved for people allowed to, with a reason (INTERFACE.md). */
export const BREAK_GLASS_PURPOSES: ReadonlySet<string> = new Set(['ETREAT', 'BTG', 'ERTREAT']);

/** Every purpose except break-glass ones: what `custos init`'s system client may claim. */
export function allOrdinaryPurposes(): string[] {
  return [...PURPOSES_OF_USE].filter((p) => !BREAK_GLASS_PURPOSES.has(p)).sort();
}
