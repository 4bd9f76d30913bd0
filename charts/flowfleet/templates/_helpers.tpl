{{/* Names are cut at 63 characters: the limit of a DNS label and of a label value. */}}

{{- define "flowfleet.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* The release name, plus the chart name unless the release name already holds it. */}}
{{- define "flowfleet.fullname" -}}
{{- if .Values.fullnameOverride }}
{{- .Values.fullnameOverride | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- $name := default .Chart.Name .Values.nameOverride }}
{{- if contains $name .Release.Name }}
{{- .Release.Name | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- printf "%s-%s" .Release.Name $name | trunc 63 | trimSuffix "-" }}
{{- end }}
{{- end }}
{{- end }}

{{/* Name of the operator's Deployment, Service and RBAC objects. */}}
{{- define "flowfleet.operatorName" -}}
{{- printf "%s-operator" (include "flowfleet.fullname" .) | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "flowfleet.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "flowfleet.operatorName" .) .Values.serviceAccount.name }}
{{- else }}
{{- required "serviceAccount.name is required when serviceAccount.create is false" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{- define "flowfleet.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/*
Selector labels of the operator pod. `component: operator` keeps them apart from the worker
pods the operator creates, which carry app.kubernetes.io/name too.
*/}}
{{- define "flowfleet.selectorLabels" -}}
app.kubernetes.io/name: {{ include "flowfleet.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/component: operator
{{- end }}

{{- define "flowfleet.labels" -}}
helm.sh/chart: {{ include "flowfleet.chart" . }}
{{ include "flowfleet.selectorLabels" . }}
app.kubernetes.io/version: {{ .Values.image.tag | default .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- end }}

{{- define "flowfleet.image" -}}
{{- printf "%s:%s" .Values.image.repository (.Values.image.tag | default .Chart.AppVersion) }}
{{- end }}
