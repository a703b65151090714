#!/usr/bin/env node
// Writes seed/demo-patients.json: one FHIR R4 transaction Bundle of synthetic demo data.
// Every person here is invented. Run `node seed/build-demo.mjs` after editing; the output is
// deterministic (fixed ids, urn:uuid values derived from names) so diffs stay readable.
//
// Patients, the ward Organization/CareTeam, the practitioners and the chatbot Device are PUT with
// fixed ids (Patient/pt-0001 ...) so demos and tests can address them directly and re-seeding updates
// rather than duplicates them. Questionnaire responses and chat messages are POSTed: they are the
// events the service ingests, and a real EHR assigns their ids.

import { createHash } from 'node:crypto';
import { writeFileSync } from 'node:fs';
import { fileURLToPath } from 'node:url';

const MRN = 'http://hospital.example.org/mrn';
const LOINC = 'http://loinc.org';
const SNOMED = 'http://snomed.info/sct';

function urn(name) {
  const h = createHash('sha1').update(`psych-cds-demo:${name}`).digest('hex');
  return `urn:uuid:${h.slice(0, 8)}-${h.slice(8, 12)}-5${h.slice(13, 16)}-a${h.slice(17, 20)}-${h.slice(20, 32)}`;
}

const entries = [];
// Returns the entry's urn:uuid: references inside the Bundle use it and the server rewrites them to
// Type/id, the way a client building a transaction without known ids does.
function put(resource) {
  const fullUrl = urn(`${resource.resourceType}/${resource.id}`);
  entries.push({ fullUrl, resource, request: { method: 'PUT', url: `${resource.resourceType}/${resource.id}` } });
  return fullUrl;
}
function post(key, resource) {
  entries.push({ fullUrl: urn(key), resource, request: { method: 'POST', url: resource.resourceType } });
}

// --- Ward, staff, chatbot ------------------------------------------------------------------------

const ward = put({
  resourceType: 'Organization',
  id: 'org-ward5',
  active: true,
  identifier: [{ system: 'http://hospital.example.org/org', value: 'WARD-5' }],
  type: [{ text: 'Hospital department' }],
  name: 'Psychiatry ward 5',
  alias: ['精神科五病区'],
});

const nurse = put({
  resourceType: 'Practitioner',
  id: 'prac-zhou-min',
  active: true,
  identifier: [{ system: 'http://hospital.example.org/staff', value: 'N-0501' }],
  name: [{ use: 'official', text: '周敏', family: '周', given: ['敏'] }],
  gender: 'female',
});

const psychiatrist = put({
  resourceType: 'Practitioner',
  id: 'prac-whitfield',
  active: true,
  identifier: [{ system: 'http://hospital.example.org/staff', value: 'D-0502' }],
  name: [{ use: 'official', text: 'Dr Sarah Whitfield', family: 'Whitfield', given: ['Sarah'], prefix: ['Dr'] }],
  gender: 'female',
});

put({
  resourceType: 'CareTeam',
  id: 'ct-ward5',
  status: 'active',
  identifier: [{ system: 'http://hospital.example.org/careteam', value: 'WARD-5' }],
  name: 'Psychiatry ward 5 / 精神科五病区',
  managingOrganization: [{ reference: ward }],
  participant: [
    {
      role: [{ coding: [{ system: SNOMED, code: '224535009', display: 'Registered nurse' }], text: 'Nurse / 护士' }],
      member: { reference: nurse, display: '周敏' },
    },
    {
      role: [{ coding: [{ system: SNOMED, code: '80584001', display: 'Psychiatrist' }], text: 'Psychiatrist / 精神科医生' }],
      member: { reference: psychiatrist, display: 'Dr Sarah Whitfield' },
    },
  ],
});

const chatbot = put({
  resourceType: 'Device',
  id: 'dev-chatbot',
  status: 'active',
  identifier: [{ system: 'http://hospital.example.org/device', value: 'CHATBOT-1' }],
  deviceName: [{ name: 'Counselling chatbot / 心理支持助手', type: 'user-friendly-name' }],
  owner: { reference: ward },
});

// --- Patients ---------------------------------------------------------------------------------------

const PEOPLE = [
  ['王', '秀英', 'female', '1998-03-14', 'zh-CN'],
  ['李', '伟', 'male', '2005-07-02', 'zh-CN'],
  ['张', '丽', 'female', '2004-11-20', 'zh-CN'],
  ['刘', '洋', 'male', '1992-01-09', 'zh-CN'],
  ['陈', '静', 'female', '2001-05-30', 'zh-CN'],
  ['杨', '帆', 'male', '2010-02-25', 'zh-CN'],
  ['Carter', 'Emily', 'female', '1996-04-12', 'en'],
  ['Miller', 'James', 'male', '1979-12-01', 'en'],
  ['Bennett', 'Olivia', 'female', '2003-08-23', 'en'],
  ['Hughes', 'Daniel', 'male', '1988-06-15', 'en'],
  ['Price', 'Hannah', 'female', '1999-10-05', 'en'],
  ['Reed', 'Michael', 'male', '1972-03-28', 'en'],
];

const patients = PEOPLE.map(([family, given, gender, birthDate, language], i) => {
  const n = String(i + 1).padStart(4, '0');
  const zh = language === 'zh-CN';
  return {
    ref: put({
      resourceType: 'Patient',
      id: `pt-${n}`,
      active: true,
      identifier: [{ use: 'usual', system: MRN, value: `MRN-${n}` }],
      name: [{ use: 'official', text: zh ? family + given : `${given} ${family}`, family, given: [given] }],
      gender,
      birthDate,
      communication: [{ language: { coding: [{ system: 'urn:ietf:bcp:47', code: language }] }, preferred: true }],
      managingOrganization: { reference: ward },
    }),
    display: zh ? family + given : `${given} ${family}`,
    zh,
  };
});
const pt = (n) => patients[n - 1];

// --- Questionnaire responses -----------------------------------------------------------------------

// LOINC answer list LL358-3, shared by PHQ-9 and GAD-7.
const FREQUENCY = [
  { system: LOINC, code: 'LA6568-5', display: 'Not at all' },
  { system: LOINC, code: 'LA6569-3', display: 'Several days' },
  { system: LOINC, code: 'LA6570-1', display: 'More than half the days' },
  { system: LOINC, code: 'LA6571-9', display: 'Nearly every day' },
];
const YES = { system: LOINC, code: 'LA33-6', display: 'Yes' };
const NO = { system: LOINC, code: 'LA32-8', display: 'No' };

const PHQ9_ITEMS = [
  ['44250-9', 'Little interest or pleasure in doing things', '做事时提不起劲或没有兴趣'],
  ['44255-8', 'Feeling down, depressed, or hopeless', '感到心情低落、沮丧或绝望'],
  ['44259-0', 'Trouble falling or staying asleep, or sleeping too much', '入睡困难、睡不安稳或睡眠过多'],
  ['44254-1', 'Feeling tired or having little energy', '感觉疲倦或没有活力'],
  ['44251-7', 'Poor appetite or overeating', '食欲不振或吃太多'],
  ['44258-2', 'Feeling bad about yourself - or that you are a failure or have let yourself or your family down', '觉得自己很糟，或觉得自己很失败，或让自己或家人失望'],
  ['44252-5', 'Trouble concentrating on things, such as reading the newspaper or watching television', '对事物专注有困难，例如阅读报纸或看电视时'],
  ['44253-3', 'Moving or speaking so slowly that other people could have noticed. Or the opposite - being so fidgety or restless that you have been moving around a lot more than usual', '动作或说话速度缓慢到别人已经察觉，或正好相反，烦躁或坐立不安、动来动去的情况更胜于平常'],
  ['44260-8', 'Thoughts that you would be better off dead, or of hurting yourself in some way', '有不如死掉或用某种方式伤害自己的念头'],
];
const GAD7_ITEMS = [
  ['69725-0', 'Feeling nervous, anxious or on edge'],
  ['68509-0', 'Not being able to stop or control worrying'],
  ['69733-4', 'Worrying too much about different things'],
  ['69734-2', 'Trouble relaxing'],
  ['69735-9', "Being so restless that it's hard to sit still"],
  ['69689-8', 'Becoming easily annoyed or irritable'],
  ['69736-7', 'Feeling afraid as if something awful might happen'],
];
const CSSRS_ITEMS = [
  ['93246-7', 'Have you wished you were dead or wished you could go to sleep and not wake up?'],
  ['93247-5', 'Have you actually had any thoughts about killing yourself?'],
  ['93248-3', 'Have you thought about how you might do this?'],
  ['93249-1', 'Have you had any intention of acting on these thoughts of killing yourself?'],
  ['93250-9', 'Have you started to work out or worked out the details of how to kill yourself? Do you intend to carry out this plan?'],
  ['93267-3', 'Have you done anything, started to do anything, or prepared to do anything to end your life?'],
  ['93269-9', 'Was this within the past 3 months?'],
];

let qrCount = 0;
function questionnaireResponse(patient, questionnaire, authored, items) {
  qrCount++;
  const id = `QR-${String(qrCount).padStart(4, '0')}`;
  post(id, {
    resourceType: 'QuestionnaireResponse',
    identifier: { system: 'http://hospital.example.org/questionnaire-response', value: id },
    questionnaire,
    status: 'completed',
    subject: { reference: patient.ref, display: patient.display },
    authored,
    item: items,
  });
}

// scores: one 0..3 value per PHQ-9 item in LOINC order; null = unanswered (total then omitted).
function phq9(patient, authored, scores) {
  const items = [];
  PHQ9_ITEMS.forEach(([code, en, zh], i) => {
    if (scores[i] === null || scores[i] === undefined) return;
    items.push({ linkId: `/${code}`, text: patient.zh ? zh : en, answer: [{ valueCoding: FREQUENCY[scores[i]] }] });
  });
  if (scores.length === 9 && scores.every((s) => s !== null)) {
    const total = scores.reduce((a, b) => a + b, 0);
    items.push({ linkId: '/44261-6', text: patient.zh ? '总分' : 'Patient Health Questionnaire 9 item total score', answer: [{ valueInteger: total }] });
  }
  questionnaireResponse(patient, 'http://loinc.org/q/44249-1', authored, items);
}

//                                           1  2  3  4  5  6  7  8  9
phq9(pt(1), '2026-11-02T09:30:00+08:00', [0, 1, 1, 0, 1, 0, 0, 0, 0]); // 3 minimal, item 9 = 0
phq9(pt(2), '2026-11-04T10:15:00+08:00', [2, 1, 2, 2, 1, 1, 2, 1, 0]); // 12 moderate, item 9 = 0
phq9(pt(3), '2026-11-07T14:00:00+08:00', [2, 2, 3, 2, 2, 2, 2, 1, 1]); // 17 moderately severe, item 9 = 1
phq9(pt(4), '2026-11-11T08:45:00+08:00', [3, 3, 3, 3, 2, 3, 2, 2, 3]); // 24 severe, item 9 = 3
phq9(pt(5), '2026-11-13T11:20:00+08:00', [2, 2, 1, 2, 1, 2, 1, 1, null]); // item 9 missing: incomplete
phq9(pt(7), '2026-11-09T16:30:00+08:00', [2, 2, 2, 1, 1, 2, 1, 2, 2]); // 15 moderately severe, item 9 = 2

// GAD-7 for James Miller: total 14 (moderate anxiety).
{
  const scores = [2, 2, 3, 2, 1, 2, 2];
  const items = GAD7_ITEMS.map(([code, text], i) => ({ linkId: `/${code}`, text, answer: [{ valueCoding: FREQUENCY[scores[i]] }] }));
  items.push({ linkId: '/70274-6', text: 'Generalized anxiety disorder 7 item total score', answer: [{ valueInteger: 14 }] });
  questionnaireResponse(pt(8), 'http://loinc.org/q/69737-5', '2026-11-14T15:00:00+08:00', items);
}

// C-SSRS screener for Daniel Hughes: ideation with method (Q3), lifetime behaviour but not in the
// past 3 months. Columbia triage: moderate.
{
  const answers = [YES, YES, YES, NO, NO, YES, NO];
  const items = CSSRS_ITEMS.map(([code, text], i) => ({ linkId: `/${code}`, text, answer: [{ valueCoding: answers[i] }] }));
  questionnaireResponse(pt(10), 'http://loinc.org/q/93373-9', '2026-11-18T10:00:00+08:00', items);
}

// --- Counselling-chat transcripts ------------------------------------------------------------------

const CHAT_CATEGORY = [
  {
    coding: [{ system: 'http://hospital.example.org/fhir/CodeSystem/communication-category', code: 'counselling-chat' }],
    text: 'counselling-chat',
  },
];

// The hospital's local time zone; timestamps keep the offset, as many EHRs send them.
const LOCAL_OFFSET = '+08:00';

// turns: [who, text] with who 'p' (patient) or 'b' (chatbot), one minute apart from `localStart`.
function chat(session, patient, localStart, turns) {
  const t0 = Date.parse(`${localStart}Z`); // wall-clock arithmetic; the offset is appended again below
  turns.forEach(([who, text], i) => {
    const sent = new Date(t0 + i * 60_000).toISOString().slice(0, 19) + LOCAL_OFFSET;
    const fromPatient = who === 'p';
    const patientRef = { reference: patient.ref, display: patient.display };
    const botRef = { reference: chatbot, display: 'Counselling chatbot' };
    post(`${session}-${i + 1}`, {
      resourceType: 'Communication',
      identifier: [
        { system: 'http://hospital.example.org/chat-session', value: session },
        { system: 'http://hospital.example.org/chat-message', value: `${session}-${i + 1}` },
      ],
      status: 'completed',
      category: CHAT_CATEGORY,
      subject: { reference: patient.ref },
      sent,
      sender: fromPatient ? patientRef : botRef,
      recipient: [fromPatient ? botRef : patientRef],
      payload: [{ contentString: text }],
    });
  });
}

chat('S-101', pt(1), '2026-11-03T21:10:00', [
  ['b', '你好，我是心理支持助手。今天感觉怎么样？'],
  ['p', '今天考试压力好大，不过还好'],
  ['b', '考试确实让人紧张。你平时有什么放松的方法吗？'],
  ['p', '跑跑步，跟室友聊聊天就好多了'],
]);

chat('S-102', pt(2), '2026-11-05T22:30:00', [
  ['p', '这作业要累死我了，笑死'],
  ['b', '听起来作业量很大。需要聊聊怎么安排时间吗？'],
  ['p', '不用啦，就是吐槽一下，写完就去打球'],
]);

chat('S-103', pt(3), '2026-11-08T23:45:00', [
  ['p', '最近睡不好，什么都提不起兴趣'],
  ['b', '听起来你最近很辛苦。这种感觉持续多久了？'],
  ['p', '有时候觉得活着没什么意思'],
  ['b', '谢谢你愿意告诉我。你有没有想过要伤害自己？'],
  ['p', '没有具体想过，就是觉得很累'],
]);

chat('S-104', pt(4), '2026-11-12T01:20:00', [
  ['p', '我不想再撑下去了'],
  ['b', '听到你这么说我很担心。你现在安全吗？'],
  ['p', '我已经攒够了安眠药，打算这周末吃掉'],
  ['b', '谢谢你告诉我，这很重要。我现在就请值班医护人员和你联系。'],
]);

chat('S-105', pt(6), '2026-11-14T16:05:00', [
  ['p', '他又在班上当众羞辱我'],
  ['b', '被当众羞辱一定很难受。能多说一点发生了什么吗？'],
  ['p', '我真想杀了他，刀已经准备好了'],
  ['b', '我听到你非常愤怒。我会请老师和医护人员马上和你聊聊。'],
]);

chat('S-201', pt(7), '2026-11-10T20:15:00', [
  ['p', "I haven't been sleeping and everything feels pointless."],
  ['b', "That sounds really hard. I'm glad you reached out. Can you tell me more?"],
  ['p', 'I keep thinking about killing myself'],
  ['b', 'Thank you for telling me. Are you safe right now?'],
  ['p', "I don't have a plan, I just can't stop the thoughts."],
]);

chat('S-202', pt(8), '2026-11-15T02:40:00', [
  ['p', "I'm done. Nobody would even notice."],
  ['b', "I'm really concerned about what you're saying. Are you thinking of ending your life?"],
  ['p', 'I have saved up the pills, I will take them all this weekend'],
  ['b', "Thank you for trusting me with this. I'm connecting you with the on-call team now."],
]);

chat('S-203', pt(9), '2026-11-16T19:00:00', [
  ['p', 'my friend said she wants to die, how can I help her'],
  ['b', "It's kind of you to look out for her. Is she safe right now?"],
  ['p', "I'm okay myself, I'm just worried about her."],
]);

const bundle = {
  resourceType: 'Bundle',
  type: 'transaction',
  meta: { tag: [{ system: 'http://hospital.example.org/tags', code: 'synthetic-demo-data', display: 'Synthetic demo data, no real persons' }] },
  entry: entries,
};

const out = fileURLToPath(new URL('./demo-patients.json', import.meta.url));
writeFileSync(out, JSON.stringify(bundle, null, 2) + '\n');
console.log(`wrote ${entries.length} entries to ${out}`);
