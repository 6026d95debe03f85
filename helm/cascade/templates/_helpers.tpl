{{/* Names and labels shared by every template. */}}
{{- define "cascade.name" -}}
{{- .Chart.Name | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{- define "cascade.fullname" -}}
{{- if contains .Chart.Name .Release.Name -}}
{{- .Release.Name | trunc 40 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name .Chart.Name | trunc 40 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}

{{- define "cascade.labels" -}}
app.kubernetes.io/name: {{ include "cascade.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version }}
{{- end -}}

{{- define "cascade.selectorLabels" -}}
app.kubernetes.io/name: {{ include "cascade.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end -}}

{{- define "cascade.image" -}}
{{ printf "%s:%s" .Values.image.repository (.Values.image.tag | default .Chart.AppVersion) }}
{{- end -}}

{{- define "cascade.apiKeySecret" -}}
{{- .Values.apiKey.existingSecret | default (printf "%s-api-key" (include "cascade.fullname" .)) -}}
{{- end -}}

{{- define "cascade.modelsClaim" -}}
{{- .Values.models.pvc.existingClaim | default (printf "%s-models" (include "cascade.fullname" .)) -}}
{{- end -}}

{{/* The queue URL the gateway and the re-distillation job share. */}}
{{- define "cascade.queueUrl" -}}
{{- if eq .Values.queue.backend "redis" -}}
{{- if .Values.queue.redis.deploy -}}
{{- printf "redis://%s-redis:6379/0" (include "cascade.fullname" .) -}}
{{- else -}}
{{- required "queue.redis.url is required when queue.backend is redis and queue.redis.deploy is false" .Values.queue.redis.url -}}
{{- end -}}
{{- else -}}
sqlite:////data/queue/queue.db
{{- end -}}
{{- end -}}

{{/* Pod and container security: non-root, no privilege escalation, no capabilities. */}}
{{- define "cascade.podSecurityContext" -}}
runAsNonRoot: true
runAsUser: {{ .Values.securityContext.runAsUser }}
runAsGroup: {{ .Values.securityContext.runAsGroup }}
fsGroup: {{ .Values.securityContext.runAsGroup }}
seccompProfile:
  type: RuntimeDefault
{{- end -}}

{{- define "cascade.containerSecurityContext" -}}
allowPrivilegeEscalation: false
readOnlyRootFilesystem: {{ .Values.securityContext.readOnlyRootFilesystem }}
capabilities:
  drop: ["ALL"]
{{- end -}}

{{/* Environment every Cascade container gets. */}}
{{- define "cascade.env" -}}
- name: CASCADE_HOME
  value: /data/models
- name: CASCADE_QUEUE_URL
  value: {{ include "cascade.queueUrl" . | quote }}
- name: CASCADE_API_KEY_FILE
  value: /etc/cascade/api-key
- name: HF_HUB_OFFLINE
  value: "1"
- name: TRANSFORMERS_OFFLINE
  value: "1"
{{- end -}}

{{- define "cascade.volumeMounts" -}}
- name: models
  mountPath: /data/models
- name: api-key
  mountPath: /etc/cascade
  readOnly: true
- name: tmp
  mountPath: /tmp
{{- if eq .Values.queue.backend "sqlite" }}
- name: queue
  mountPath: /data/queue
{{- end }}
{{- end -}}

{{- define "cascade.volumes" -}}
- name: models
  persistentVolumeClaim:
    claimName: {{ include "cascade.modelsClaim" . }}
- name: api-key
  secret:
    secretName: {{ include "cascade.apiKeySecret" . }}
    items:
      - key: api-key
        path: api-key
- name: tmp
  emptyDir: {}
{{- if eq .Values.queue.backend "sqlite" }}
- name: queue
  persistentVolumeClaim:
    claimName: {{ include "cascade.fullname" . }}-queue
{{- end }}
{{- end -}}

{{/* Copies the bundle from S3-compatible storage into the models volume before Ray starts. */}}
{{- define "cascade.modelsInit" -}}
{{- if eq .Values.models.source "s3" }}
initContainers:
  - name: fetch-models
    image: {{ .Values.models.s3.image }}
    command: ["sh", "-c"]
    args:
      - aws s3 sync {{ required "models.s3.url is required when models.source is s3" .Values.models.s3.url | quote }} /data/models/registry {{- if .Values.models.s3.endpoint }} --endpoint-url {{ .Values.models.s3.endpoint | quote }}{{ end }}
    envFrom:
      - secretRef:
          name: {{ required "models.s3.credentialsSecret is required when models.source is s3" .Values.models.s3.credentialsSecret }}
    env:
      - name: HOME
        value: /tmp
    securityContext:
      {{- include "cascade.containerSecurityContext" . | nindent 6 }}
    volumeMounts:
      - name: models
        mountPath: /data/models
      - name: tmp
        mountPath: /tmp
{{- end }}
{{- end -}}

{{/* Serve's fast path (HAProxy ingress, throughput-optimised), on every Ray node. */}}
{{- define "cascade.fastPathEnv" -}}
{{- if .Values.serve.fastPath }}
- name: RAY_SERVE_ENABLE_HA_PROXY
  value: "1"
- name: RAY_SERVE_THROUGHPUT_OPTIMIZED
  value: "1"
- name: RAY_SERVE_PROXY_READY_CHECK_TIMEOUT_S
  value: "30"
- name: RAY_SERVE_PROXY_HEALTH_CHECK_TIMEOUT_S
  value: "30"
{{- end }}
{{- end -}}
